"""Issues 3 and 4's targets, checked against the measured results in bench/results/ (nothing is measured here).

Issue 3 reads the JSON the other benchmarks wrote (formats, methods*, *-eval from `weightwise eval`,
peers, peers-gptq-speed, minilm), all on the same 16 pydoc eval windows of the default SmolLM2 (source
ppl 15.092). Recipes that can represent the source's Q4_1 grid (asymmetric INT ≥ 4 with groups dividing
32) are left out of every comparison, as the issue asks. Issue 4 reads tune.json (bench/tune.py) and,
for the patch size at density 5 %, tune-density05.json. One row per target: the figure that decides
it, where it comes from, and met / missed / not measured.

    .venv/bin/python bench/targets.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def on_source_grid(row: dict) -> bool:
    recipe = row.get("recipe") or {}
    match = re.fullmatch(r"int(\d)_asym", recipe.get("format", ""))
    group = recipe.get("group_size") or 64
    return bool(match) and int(match.group(1)) >= 4 and 32 % group == 0


def weightwise_rows() -> list[dict]:
    """Every measured weightwise SmolLM2 row: (label, bits/weight, ppl, planner?)."""
    rows = []
    for file in ["formats.json", *sorted(p.name for p in RESULTS.glob("methods*.json"))]:
        for r in (load(file) or {}).get("rows", []):
            if r["name"] != "source fp32" and not on_source_grid(r):
                rows.append({"label": f"{r['name']} ({file})", "bpw": r["bits_per_weight"], "ppl": r["ppl"],
                             "planned": r.get("recipe", {}).get("target_bpw") is not None})
    for file in sorted(RESULTS.glob("*-eval.json")):  # `weightwise eval` of single runs
        for r in json.loads(file.read_text()).get("runs", []):
            rows.append({"label": f"{r['name']} ({file.name})", "bpw": r["bits_per_weight"], "ppl": r["ppl"],
                         "planned": (r.get("recipe") or {}).get("target_bpw") is not None})
    for r in (load("peers.json") or {}).get("rows", []):
        if r["tool"] == "weightwise" and r.get("ppl") is not None and r["model"] == "smollm2":
            rows.append({"label": f"{r['setting']} (peers.json)", "bpw": r["bits_per_weight"], "ppl": r["ppl"], "planned": False})
    return rows


def best(rows: list[dict], max_bpw: float, planned: bool | None = None) -> dict | None:
    fitting = [r for r in rows if r["bpw"] <= max_bpw + 1e-9 and (planned is None or r["planned"] == planned)]
    return min(fitting, key=lambda r: r["ppl"]) if fitting else None


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "**met**" if ok else "missed"


def issue3() -> list[str]:
    peers = load("peers.json") or {"rows": [], "source": {"ppl": None}}
    source_ppl = peers["source"]["ppl"] or 15.0918
    rows = weightwise_rows()
    lines = ["| target | measured | verdict |", "|---|---|---|"]

    formats = {r["name"]: r for r in (load("formats.json") or {}).get("rows", [])}
    gptq3 = next(iter((load("gptq-int3-g64-act-eval.json") or {}).get("runs", [])), None)
    rtn3 = formats.get("int3 g64 rtn")
    if gptq3 and rtn3:
        ratio = (gptq3["ppl"] - source_ppl) / (rtn3["ppl"] - source_ppl)
        lines.append(f"| GPTQ INT3 g64 ΔPPL ≤ 0.25 × RTN's | {gptq3['ppl']:.3f} vs RTN {rtn3['ppl']:.3f}: {ratio:.2f}× | {verdict(ratio <= 0.25)} |")

    for r in peers["rows"]:
        if r["tool"] != "llama.cpp" or r.get("ppl") is None or not r["model"] == "smollm2":
            continue
        ours = best(rows, r["bits_per_weight"])
        text = "none at that size" if ours is None else f"{ours['label']}: {ours['bpw']:.3f} b/w, ppl {ours['ppl']:.3f}"
        lines.append(f"| beat llama.cpp {r['setting']} ({r['bits_per_weight']:.3f} b/w, ppl {r['ppl']:.3f}) | {text} | "
                     f"{verdict(ours is not None and ours['ppl'] < r['ppl'])} |")

    small = best(rows, 3.5)
    lines.append(f"| ≤ 3.5 b/w with ppl ≤ 1.5 × source ({1.5 * source_ppl:.2f}) | "
                 f"{small['label']}: {small['bpw']:.3f} b/w, ppl {small['ppl']:.3f} | {verdict(small['ppl'] <= 1.5 * source_ppl)} |")

    planned = [r for r in rows if r["planned"] and abs(r["bpw"] - 3.0) < 0.01]
    uniform = best(rows, 3.0, planned=False)
    if planned:
        plan = min(planned, key=lambda r: r["ppl"])
        lines.append(f"| planner at 3.0 b/w beats the best uniform ≤ 3.0 | planner {plan['ppl']:.3f} ({plan['label']}) vs "
                     f"{uniform['label']} {uniform['ppl']:.3f} | {verdict(plan['ppl'] < uniform['ppl'])} |")
    else:
        lines.append("| planner at 3.0 b/w beats the best uniform ≤ 3.0 | – | not measured |")

    tiny = best(rows, 2.5)
    lines.append(f"| stretch: ≤ 2.5 b/w with ppl ≤ 4 × source ({4 * source_ppl:.2f}) | "
                 + (f"{tiny['label']}: {tiny['bpw']:.3f} b/w, ppl {tiny['ppl']:.4g} | {verdict(tiny['ppl'] <= 4 * source_ppl)} |"
                    if tiny else "– | not measured |"))

    minilm = {r["name"]: r for r in (load("minilm.json") or {}).get("rows", [])}
    gptq4 = max((r for name, r in minilm.items() if re.match(r"int4(_asym)? g128 gptq", name)),
                key=lambda r: r["cosine_mean"], default=None)  # any GPTQ variant at INT4 g128
    rtn4 = minilm.get("int4 g128 rtn")
    if gptq4 and rtn4:
        ok = gptq4["cosine_mean"] >= 0.99 and gptq4["cosine_mean"] > rtn4["cosine_mean"]
        lines.append(f"| MiniLM GPTQ INT4 g128 cosine ≥ 0.99 and > RTN | {gptq4['name']}: {gptq4['cosine_mean']:.5f} vs RTN "
                     f"{rtn4['cosine_mean']:.5f} | {verdict(ok)} |")

    latest = next((r for r in (load("methods-s3.json") or {}).get("rows", []) if r["name"] == "gptq-int3-g64"), None)
    manifest = load("gptq-int3-g64-act-manifest.json")
    if latest:  # this session's run (128 × 512 calibration, machine alone)
        seconds = latest["quantize_seconds"]
        lines.append(f"| GPTQ 128 × 512 ≤ 10 min on 2 cores | {seconds:.0f} s (int3 g64, methods-s3.json, machine alone) | "
                     f"{verdict(seconds <= 600)} |")
    elif manifest:
        seconds = manifest["timings"]["quantize_seconds"]
        lines.append(f"| GPTQ 128 × 512 ≤ 10 min on 2 cores | {seconds:.0f} s (int3 g64, machine alone) | {verdict(seconds <= 600)} |")
    speed_file = "peers-gptq-speed.json" if load("peers-gptq-speed.json") else "peers.json"
    speed_rows = load(speed_file)["rows"] if load(speed_file) else []
    ours = next((r for r in speed_rows if r["tool"] == "weightwise" and "GPTQ" in r["setting"] and "quantize_seconds" in r), None)
    theirs = next((r for r in speed_rows if r["tool"] == "llm-compressor" and "W4" in r["setting"] and "quantize_seconds" in r), None)
    if ours and theirs:
        ratio = theirs["quantize_seconds"] / ours["quantize_seconds"]
        lines.append(f"| GPTQ faster than llm-compressor's (same run, {speed_file}) | weightwise {ours['quantize_seconds']:.0f} s, "
                     f"llm-compressor {theirs['quantize_seconds']:.0f} s: {ratio:.2f}× | {verdict(ratio > 1)} |")
    return lines


def issue4() -> list[str]:
    tune = load("tune.json")
    if not tune:
        return ["| issue 4 targets | – | not measured |"]
    rows = tune["rows"]
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    lift, full, lora = rows.get("lift"), rows.get("full"), rows.get("lora")
    before = next(r["before"] for r in rows.values() if r.get("before"))
    ppl0 = before["retention"]["ppl"]

    def accuracy(r: dict) -> float:
        return r["after"]["exact_match"]["accuracy"]

    def delta_ppl(r: dict) -> float:
        return r["after"]["retention"]["ppl"] - ppl0

    if lift and full:
        lines.append(f"| LIFT accuracy ≥ full fine-tuning's − 1 point | {accuracy(lift):.3f} vs full {accuracy(full):.3f} | "
                     f"{verdict(accuracy(lift) >= accuracy(full) - 0.01 - 1e-9)} |")
        lines.append(f"| LIFT retention: ΔPPL ≤ 0.5 × full's | {delta_ppl(lift):+.3f} vs full {delta_ppl(full):+.3f} | "
                     f"{verdict(delta_ppl(lift) <= 0.5 * delta_ppl(full))} |")
        share = lift["optimizer_state_bytes"] / full["optimizer_state_bytes"]
        lines.append(f"| LIFT optimizer state ≤ 6 % of full's | {lift['optimizer_state_bytes'] / 1e6:.1f} MB vs "
                     f"{full['optimizer_state_bytes'] / 1e6:.1f} MB: {share:.1%} | {verdict(share <= 0.06)} |")
    if lift and lora:
        lines.append(f"| LIFT accuracy ≥ LoRA's | {accuracy(lift):.3f} vs LoRA {accuracy(lora):.3f} | "
                     f"{verdict(accuracy(lift) >= accuracy(lora))} |")
        rss = lift["train"]["peak_rss_mb"] / lora["train"]["peak_rss_mb"]
        lines.append(f"| LIFT peak RSS ≤ 1.15 × LoRA's | {lift['train']['peak_rss_mb']:.0f} MB vs {lora['train']['peak_rss_mb']:.0f} MB: "
                     f"{rss:.2f}× | {verdict(rss <= 1.15)} |")
    dense = (load("tune-density05.json") or {}).get("rows", {}).get("lift")
    if dense and dense.get("result_bytes") and dense.get("model_params"):
        fraction = dense["result_bytes"] / (2 * dense["model_params"])
        lines.append(f"| patch ≤ 1/15 of the fp16 model at density 5 % | {dense['result_bytes'] / 1e6:.2f} MB: 1/{1 / fraction:.1f} | "
                     f"{verdict(fraction <= 1 / 15)} |")
    else:
        lines.append("| patch ≤ 1/15 of the fp16 model at density 5 % | – | not measured |")
    return lines


def main() -> None:
    print("Issue 3\n\n" + "\n".join(issue3()) + "\n\nIssue 4\n\n" + "\n".join(issue4()))


if __name__ == "__main__":
    main()
