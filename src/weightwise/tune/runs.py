"""A finished tune run as a model: its base model with the result merged (a sparse patch added, a peft adapter merged),
or a qat run's quantized model.

This is how :func:`weightwise.load_model` (and so eval, quantize and export) takes a tune run folder.
"""

from __future__ import annotations

from pathlib import Path

from weightwise.errors import WeightwiseError
from weightwise.io.artifacts import read_manifest, state_dict_fingerprint
from weightwise.io.folders import load_quantized
from weightwise.tune.methods import ADAPTER_DIR, PATCH_FILE
from weightwise.tune.patch import WeightPatch
from weightwise.tune.qat import MODEL_DIR


def load_tune_run(path: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False):
    """(model, tokenizer): the run's base model (from its manifest's source) with the tuned result merged in, or a
    qat run's quantized model."""
    from weightwise.io.models import load_model

    path = Path(path)
    manifest = read_manifest(path)
    files = manifest.get("files") or []
    if not isinstance(files, list):
        raise WeightwiseError(f"'{path}/manifest.json' is damaged (its 'files' is not a list); re-run the tuning")
    if MODEL_DIR in files:  # qat: the result is a whole quantized model
        return load_quantized(path / MODEL_DIR)
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    base_source = source.get("source") if source.get("source") in ("default", "minilm") else source.get("path")
    if not isinstance(base_source, str) or not base_source:
        raise WeightwiseError(f"'{path}/manifest.json' does not name the base model the run was tuned from; re-run the tuning")
    model, tokenizer = load_model(base_source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if PATCH_FILE in files:
        WeightPatch.load(path / PATCH_FILE).apply(model)
    elif ADAPTER_DIR in files:
        from peft import PeftModel

        if state_dict_fingerprint(model) != manifest.get("base_model_hash"):
            raise WeightwiseError(f"the base model at '{base_source}' changed since '{path}' was tuned on it; re-run the tuning")
        model = PeftModel.from_pretrained(model, str(path / ADAPTER_DIR)).merge_and_unload()
    else:
        raise WeightwiseError(f"'{path}' holds no finished tune result ({PATCH_FILE}, {ADAPTER_DIR}/ or {MODEL_DIR}/); "
                              "finish or re-run the tuning")
    model.eval()
    return model, tokenizer
