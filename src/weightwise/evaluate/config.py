"""EvalConfig: the evaluation settings shared by `weightwise eval`, the demo, the benchmarks and the API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from weightwise.data.corpora import corpus, join_documents


class EvalConfig(BaseModel):
    """Which text to score and how.

    The protocol: the documents of ``text``/``split`` are joined into one stream with a blank line
    between them and tokenized without special tokens (no BOS); the ids are cut into non-overlapping
    windows of ``window`` tokens, the last partial window dropped (``max_tokens`` keeps the first whole
    windows, at least one); every position of a window but its first is scored, and
    ``ppl = exp(mean NLL)`` over all scored positions.
    """

    model_config = ConfigDict(extra="forbid")

    version: int = Field(1, description="Config schema version.")
    text: str = Field("pydoc", description="Text source: 'pydoc' (CPython's topics) or a text file (any name: recognised by content) or .jsonl file (JSONL: 'text' field).")
    split: str = Field("eval", description="Split of 'pydoc': eval (topics i % 4 == 0), calib or all.")
    max_tokens: int | None = Field(None, ge=1, description="Score at most this many tokens (whole windows; quick runs). Default: all.")
    window: int = Field(512, ge=2, description="Tokens per non-overlapping window.")
    batch_size: int = Field(4, ge=1, description="Windows per forward call.")
    measure_speed: bool = Field(True, description="Also time forward passes (tokens/s).")
    stream: bool = Field(False, description="Read each model block by block and run every window through one block at a "
                         "time (memory: one block and the windows' hidden states; for models larger than memory). Same "
                         "figures, no speed. Hugging Face folders, hub ids, .gguf files and quantized runs.")

    def load_text(self) -> str:
        return join_documents(corpus(self.text, self.split))
