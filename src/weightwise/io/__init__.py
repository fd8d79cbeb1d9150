"""Loading models, writing artifacts atomically under output locks, manifests and hashes."""

from weightwise.io.artifacts import (
    atomic_output_dir,
    cache_dir,
    environment_versions,
    file_sha256,
    output_lock,
    read_manifest,
    state_dict_fingerprint,
    write_bytes_atomic,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from weightwise.io.defaults import DEFAULT_MODEL_NAME, default_gguf_path
from weightwise.io.models import load_model, load_tokenizer, model_source_info

__all__ = [
    "DEFAULT_MODEL_NAME",
    "atomic_output_dir",
    "cache_dir",
    "default_gguf_path",
    "environment_versions",
    "file_sha256",
    "load_model",
    "load_tokenizer",
    "model_source_info",
    "output_lock",
    "read_manifest",
    "state_dict_fingerprint",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_manifest",
    "write_text_atomic",
]
