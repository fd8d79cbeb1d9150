"""Benchmark: the whole path for a tuned model — LIFT on the arithmetic task, merged, GPTQ-quantized (clip search), exported to GGUF
Q4_0, run in llama.cpp — exact match on held-out problems in llama.cpp beside the same quantized model in weightwise.

Both sides see the same prompt token ids (weightwise's chat formatting, `weightwise.data.tasks.prompt_ids`) and decode
greedily for the same number of new tokens, stopping at the model's end-of-sequence / end-of-turn ids; answers are
compared with `weightwise.evaluate.tasks.normalize_answer`. llama.cpp quantizes activations to 8 bits in its CPU
Q4_0 matmuls, so a few answers may differ; the table reports how many.

    .venv/bin/python bench/tuned_to_llamacpp.py            # 250 LIFT steps, GPTQ int4 g32 (128 × 512), 100 problems (~25 min on 2 idle cores)
    .venv/bin/python bench/tuned_to_llamacpp.py --quick    # 4 steps, 16 × 256 calibration, 8 problems: the wiring
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from weightwise.data.tasks import prompt_ids, stop_token_ids, task_examples
from weightwise.evaluate.tasks import exact_match, normalize_answer
from weightwise.export import export_source
from weightwise.export.gguf import GGUFExportConfig
from weightwise.io.artifacts import environment_versions, write_json_atomic
from weightwise.io.folders import save
from weightwise.io.models import load_model, model_source_info
from weightwise.quantize import quantize
from weightwise.tune.api import tune
from weightwise.tune.config import TuneConfig

RESULTS = Path(__file__).parent / "results"


def llama_cpp_answers(path: Path, tokenizer, examples, max_new_tokens: int) -> list[str]:
    """Greedy answers from llama.cpp for weightwise's own prompt ids."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, verbose=False)
    stops = set(stop_token_ids(tokenizer)) | {llm.token_eos()}
    answers = []
    for example in examples:
        llm.reset()
        new = []
        for token in llm.generate(prompt_ids(tokenizer, example), temp=0.0, top_k=1, reset=True):
            if token in stops or len(new) == max_new_tokens:
                break
            new.append(token)
        answers.append(tokenizer.decode(new, skip_special_tokens=True))
    llm.close()
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-tuned-path"))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    steps, problems, calib = (4, 8, {"samples": 16, "seq_len": 256}) if args.quick else (args.steps, args.problems, {"samples": 128, "seq_len": 512})
    out = RESULTS / ("tuned-to-llamacpp-quick.json" if args.quick else "tuned-to-llamacpp.json")
    timings = {}

    tuned_run = args.runs / "lift"
    if not (tuned_run / "manifest.json").is_file():
        model, tokenizer = load_model("default")
        config = TuneConfig(task="arithmetic", method="lift", train_examples=2000, max_steps=steps, batch_size=8,
                            test_examples=0, retention_max_tokens=0, checkpoint_every=50, seed=0)
        started = time.perf_counter()
        tune(model, tokenizer, config, tuned_run, source=model_source_info("default"))
        timings["tune_seconds"] = time.perf_counter() - started
        del model
    tuned, tokenizer = load_model(tuned_run)  # the base with the LIFT patch merged
    recipe = {"format": "int4", "group_size": 32, "method": {"name": "gptq", "clip_search": True}, "calibration": calib}
    started = time.perf_counter()
    qmodel = quantize(tuned, recipe, tokenizer=tokenizer)
    timings["quantize_seconds"] = time.perf_counter() - started
    run = save(qmodel, args.runs / "lift-gptq4", tokenizer=tokenizer, source=model_source_info(tuned_run))
    gguf_path = args.runs / "lift-gptq4.gguf"
    report = export_source(run, "gguf", gguf_path, gguf=GGUFExportConfig(embeddings="q8_0"), overwrite=True)

    examples = task_examples("arithmetic", "test", problems)
    started = time.perf_counter()
    ours = exact_match(qmodel, tokenizer, examples, max_new_tokens=args.max_new_tokens, n_samples=len(examples))
    timings["weightwise_seconds"] = time.perf_counter() - started
    ww_answers = [sample["got"] for sample in ours["samples"]]
    started = time.perf_counter()
    cpp_answers = llama_cpp_answers(gguf_path, tokenizer, examples, args.max_new_tokens)
    timings["llama_cpp_seconds"] = time.perf_counter() - started
    cpp_correct = sum(normalize_answer(got) == normalize_answer(ex.response) for got, ex in zip(cpp_answers, examples))
    same = sum(a == b for a, b in zip(ww_answers, cpp_answers))
    tuned_float = exact_match(tuned, tokenizer, examples, max_new_tokens=args.max_new_tokens)
    result = {
        "settings": {"steps": steps, "problems": problems, "calibration": calib, "recipe": recipe, "quick": args.quick},
        "versions": environment_versions(),
        "exact_match": {"tuned_float_weightwise": tuned_float["accuracy"], "quantized_weightwise": ours["accuracy"],
                        "quantized_llama_cpp": cpp_correct / len(examples)},
        "identical_answers": same, "problems": len(examples),
        "gguf": {"path": str(gguf_path), "bytes": report["file_bytes"],
                 "exact_tensors": sum(t["how"] == "exact" for t in report["tensors"])},
        "timings": timings,
        "disagreements": [{"prompt": ex.prompt, "expected": ex.response, "weightwise": a, "llama_cpp": b}
                          for ex, a, b in zip(examples, ww_answers, cpp_answers) if a != b][:20],
    }
    write_json_atomic(out, result)
    em = result["exact_match"]
    print(f"LIFT {steps} steps → GPTQ int4 g32 → GGUF Q4_0 ({report['file_bytes'] / 1e6:.1f} MB), {len(examples)} held-out problems\n")
    print("| model | where | exact match |\n|---|---|---:|")
    print(f"| tuned, float | weightwise | {em['tuned_float_weightwise']:.3f} |")
    print(f"| tuned, GPTQ int4 g32 | weightwise | {em['quantized_weightwise']:.3f} |")
    print(f"| tuned, GPTQ int4 g32 → Q4_0 | llama.cpp | {em['quantized_llama_cpp']:.3f} |")
    print(f"\nidentical answers: {same} of {len(examples)}; timings: " + json.dumps({k: round(v, 1) for k, v in timings.items()}))


if __name__ == "__main__":
    main()
