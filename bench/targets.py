"""The calibrated quantization targets and the fine-tuning targets, checked against the measured results
in bench/results/ (nothing is measured here).

Every figure comes from a results file; a target none of them measures is "not measured". When
several files or runs measure the same thing (one recipe evaluated in two runs, one comparison made
in two runs), every run is read and shown in the "measured" column, and the target is **met** only
if it holds in each of them; "mixed: met in k of n" when it holds in some, "missed" when in none.

Quantization targets read the JSON the other benchmarks wrote (formats, methods*, *-eval from
`weightwise eval`, peers*, minilm) on the default SmolLM2's pydoc eval windows. Each run is judged
against its own source perplexity: the reference_ppl its rows carry, or its file's source row. Rows
are grouped into runs of one recipe by their recipe (options left off are ignored, so a file written
before an option existed still matches; a peers row without a recipe takes the recipe of the formats
row of the same name). Recipes that can represent the source's Q4_1 grid (asymmetric INT ≥ 4 with
groups dividing 32) reproduce the source and are left out of every comparison.

Fine-tuning targets read every tune*.json run made at the rank budget (bench/tune.py) and, for the
patch size at density 5 %, every run made with --density 0.05.

    .venv/bin/python bench/targets.py
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from itertools import product
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# Options that make a recipe more than plain RTN/GPTQ (top level of a recipe, and inside its method).
EXTRAS = {"lorc_rank", "act_format", "smoothquant_alpha", "bias_correction", "block_tune", "target_bpw"}
PLAIN_METHOD_KEYS = {"name", "damp", "block_size", "act_order", "static_groups"}


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def loaded(pattern: str) -> list[tuple[str, dict]]:
    return [(path.name, json.loads(path.read_text())) for path in sorted(RESULTS.glob(pattern))]


def normalized(value):
    """A recipe without its options left off (None, False, 0, "none", empty), recursively, and without
    the planner's settings (candidates, plan_*) unless it has a bits/weight budget to plan for."""
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in sorted(value.items()):
        item = normalized(item)
        if item is None or item is False or item == 0 or item == "none" or item == {} or item == []:
            continue
        out[key] = item
    if "target_bpw" not in out and "format" in out:
        out = {k: v for k, v in out.items() if k != "candidates" and not k.startswith("plan_")}
    return out


def on_source_grid(recipe: dict) -> bool:
    match = re.fullmatch(r"int(\d)_asym", recipe.get("format", ""))
    group = recipe.get("group_size") or 64
    return bool(match) and int(match.group(1)) >= 4 and 32 % group == 0


def is_plain(recipe: dict | None, fmt: str, group: int, method: str) -> bool:
    """The recipe is `fmt` in groups of `group` by `method` with none of the extra options."""
    if not recipe or recipe.get("format") != fmt or recipe.get("group_size") != group:
        return False
    m = recipe.get("method") or {}
    return m.get("name") == method and not EXTRAS & recipe.keys() and set(m) <= PLAIN_METHOD_KEYS


# ---------------------------------------------------------------- runs


def run(name: str, file: str, recipe: dict | None, row: dict, source: float | None, key: str | None = None) -> dict:
    recipe = normalized(recipe) if recipe else None
    return {"name": name, "file": file, "recipe": recipe, "bpw": row["bits_per_weight"], "ppl": row["ppl"],
            "source": source, "seconds": row.get("quantize_seconds"),
            "planned": bool(recipe and recipe.get("target_bpw") is not None),
            "key": key or json.dumps(recipe, sort_keys=True)}


def smollm2_runs() -> list[dict]:
    """Every measured weightwise SmolLM2 row, each with its own run's source perplexity."""
    runs, by_name = [], {}
    for file, data in loaded("formats.json") + loaded("methods*.json"):
        rows = data.get("rows", [])
        source = next((r["ppl"] for r in rows if r["name"] == "source fp32"), None)
        for r in rows:
            if r["name"] != "source fp32" and r.get("ppl") is not None and not on_source_grid(r.get("recipe") or {}):
                runs.append(run(r["name"], file, r.get("recipe"), r, r.get("reference_ppl") or source))
                by_name.setdefault(r["name"].lower(), r.get("recipe"))
    for file, data in loaded("*-eval.json"):  # `weightwise eval` of single models
        for r in data.get("runs", []):
            if r.get("ppl") is not None and not on_source_grid(r.get("recipe") or {}):
                runs.append(run(r["name"], file, r.get("recipe"), r, r.get("reference_ppl")))
    for file, data in loaded("peers*.json"):
        source = (data.get("source") or {}).get("ppl")
        for r in data.get("rows", []):
            if r["tool"] == "weightwise" and r["model"] == "smollm2" and r.get("ppl") is not None:
                recipe = by_name.get(r["setting"].lower())
                key = None if recipe else f"weightwise {r['setting'].lower()}"
                runs.append(run(r["setting"], file, recipe, r, source, key))
    return runs


def peer_runs(tool: str) -> dict[str, list[dict]]:
    """A peer tool's SmolLM2 runs by setting, across every peers*.json."""
    out = defaultdict(list)
    for file, data in loaded("peers*.json"):
        for r in data.get("rows", []):
            if r["tool"] == tool and r["model"] == "smollm2" and r.get("ppl") is not None:
                out[r["setting"]].append({**r, "file": file})
    return out


def groups(runs: list[dict]) -> list[list[dict]]:
    """Runs of one recipe together."""
    out = defaultdict(list)
    for r in runs:
        out[r["key"]].append(r)
    return list(out.values())


def best_group(runs: list[dict], max_bpw: float, planned: bool | None = None, score=lambda r: r["ppl"]) -> list[dict] | None:
    """The recipe whose worst run scores lowest, among recipes of at most `max_bpw` bits/weight."""
    fitting = [r for r in runs if r["bpw"] <= max_bpw + 1e-9 and (planned is None or r["planned"] == planned)]
    return min(groups(fitting), key=lambda g: max(score(r) for r in g), default=None)


# ---------------------------------------------------------------- table


def row(target: str, measured: str, checks: list[bool], unit: str = "runs") -> str:
    """One table row; met only if every check (one per run, or per pair of runs) holds."""
    if not checks:
        return f"| {target} | – | not measured |"
    k, n = sum(checks), len(checks)
    verdict = "**met**" if k == n else "missed" if k == 0 else f"mixed: met in {k} of {n} {unit}"
    return f"| {target} | {measured} | {verdict} |"


def figures(runs: list[dict], field: str = "ppl", fmt: str = "{:.3f}") -> str:
    return ", ".join(f"{fmt.format(r[field])} ({r['file']})" for r in runs)


def pair_unit(a: list, b: list) -> str:
    """What a comparison of every run of `a` with every run of `b` counts."""
    return "runs" if min(len(a), len(b)) <= 1 else "pairs of runs"


def quantization() -> list[str]:
    runs = smollm2_runs()
    lines = ["| target | measured | verdict |", "|---|---|---|"]

    gptq3 = [r for r in runs if is_plain(r["recipe"], "int3", 64, "gptq") and r["recipe"]["method"].get("act_order")]
    rtn3 = [r for r in runs if is_plain(r["recipe"], "int3", 64, "rtn")]
    pairs = [(g, t) for g, t in product(gptq3, rtn3) if g["source"] and t["source"]]
    ratios = [(g["ppl"] - g["source"]) / (t["ppl"] - t["source"]) for g, t in pairs]
    lines.append(row("GPTQ INT3 g64 (act order) ΔPPL ≤ 0.25 × RTN's",
                     f"GPTQ {figures(gptq3)} vs RTN {figures(rtn3)}: "
                     + "–".join(dict.fromkeys(f"{x:.2f}×" for x in sorted(ratios))),
                     [x <= 0.25 for x in ratios], pair_unit(gptq3, rtn3)))

    llama = peer_runs("llama.cpp")
    for setting, theirs in llama.items():
        bits = min(t["bits_per_weight"] for t in theirs)
        ours = best_group(runs, bits) or []
        target = f"beat llama.cpp {setting} ({bits:.3f} b/w, ppl {figures(theirs)})"
        text = f"{ours[0]['name']}: {ours[0]['bpw']:.3f} b/w, ppl {figures(ours)}" if ours else "none at that size"
        checks = [o["ppl"] < t["ppl"] for o, t in product(ours, theirs)] if ours else [False]
        lines.append(row(target, text, checks, pair_unit(ours, theirs)))
    if not llama:
        lines.append(row("beat llama.cpp's types at their size", "", []))

    for max_bpw, factor, label in [(3.5, 1.5, ""), (2.5, 4, "stretch: ")]:
        g = best_group([r for r in runs if r["source"]], max_bpw, score=lambda r: r["ppl"] / r["source"]) or []
        text = (f"{g[0]['name']}: {g[0]['bpw']:.3f} b/w, " if g else "") + ", ".join(
            f"ppl {r['ppl']:.3f} vs {factor:g} × {r['source']:.3f} = {factor * r['source']:.2f} ({r['file']})" for r in g)
        lines.append(row(f"{label}≤ {max_bpw:g} b/w with ppl ≤ {factor:g} × source", text,
                         [r["ppl"] <= factor * r["source"] for r in g]))

    plan = best_group([r for r in runs if r["planned"] and abs(r["bpw"] - 3.0) < 0.01], 3.0) or []
    uniform = best_group(runs, 3.0, planned=False) or []
    lines.append(row("planner at 3.0 b/w beats the best uniform ≤ 3.0",
                     f"planner {plan[0]['name'] if plan else '–'} {figures(plan)} vs "
                     f"{uniform[0]['name'] if uniform else '–'} {figures(uniform)}",
                     [p["ppl"] < u["ppl"] for p, u in product(plan, uniform)], pair_unit(plan, uniform)))

    minilm = [{**r, "file": file, "recipe": normalized(r["recipe"]), "key": json.dumps(normalized(r["recipe"]), sort_keys=True)}
              for file, data in loaded("minilm*.json") for r in data.get("rows", []) + data.get("sweep", [])
              if r.get("cosine_mean") is not None and r.get("recipe")]
    gptq4 = max(groups([r for r in minilm if re.fullmatch(r"int4(_asym)?", r["recipe"].get("format", ""))
                        and r["recipe"].get("group_size") == 128 and r["recipe"]["method"]["name"] == "gptq"]),
                key=lambda g: min(r["cosine_mean"] for r in g), default=[])  # any GPTQ variant at INT4 g128
    rtn4 = [r for r in minilm if is_plain(r["recipe"], "int4", 128, "rtn")]
    lines.append(row("MiniLM GPTQ INT4 g128 cosine ≥ 0.99 and > RTN",
                     f"{gptq4[0]['name'] if gptq4 else '–'}: {figures(gptq4, 'cosine_mean', '{:.5f}')} vs RTN "
                     f"{figures(rtn4, 'cosine_mean', '{:.5f}')}",
                     [g["cosine_mean"] >= 0.99 and g["cosine_mean"] > t["cosine_mean"] for g, t in product(gptq4, rtn4)],
                     pair_unit(gptq4, rtn4)))

    timed = [r for r in gptq3 if r["seconds"] is not None
             and (r["recipe"].get("calibration") or {}).get("samples") == 128
             and (r["recipe"].get("calibration") or {}).get("seq_len") == 512]
    lines.append(row("GPTQ INT3 g64 (act order), 128 × 512 calibration, ≤ 10 min on 2 cores",
                     ", ".join(f"{r['seconds']:.0f} s ({r['file']})" for r in timed), [r["seconds"] <= 600 for r in timed]))

    speed, texts = [], []
    for file, data in loaded("peers*.json"):
        rows = [r for r in data.get("rows", []) if r["model"] == "smollm2" and r.get("quantize_seconds")]
        ours = next((r for r in rows if r["tool"] == "weightwise" and "GPTQ" in r["setting"]), None)
        theirs = next((r for r in rows if r["tool"] == "llm-compressor" and "W4" in r["setting"]), None)
        if ours and theirs:
            ratio = theirs["quantize_seconds"] / ours["quantize_seconds"]
            speed.append(ratio > 1)
            texts.append(f"{file}: weightwise {ours['quantize_seconds']:.0f} s, llm-compressor "
                         f"{theirs['quantize_seconds']:.0f} s: {ratio:.2f}×")
    lines.append(row("GPTQ faster than llm-compressor's (both in the same run)", "; ".join(texts), speed))
    return lines


def fine_tuning() -> list[str]:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    runs = [(file, data["settings"], data["rows"]) for file, data in loaded("tune*.json")
            if not data.get("settings", {}).get("density")]

    def accuracy(r: dict) -> float:
        return r["after"]["exact_match"]["accuracy"]

    def delta_ppl(r: dict, rows: dict) -> float:
        before = next(x["before"] for x in rows.values() if x.get("before"))
        return r["after"]["retention"]["ppl"] - before["retention"]["ppl"]

    def per_run(methods: tuple[str, ...], figure, ok) -> tuple[str, list[bool]]:
        chosen = [(file, s, rows) for file, s, rows in runs if all(m in rows for m in methods)]
        text = "; ".join(f"{file} ({s['steps']} steps, {s['test_examples']} problems): {figure(rows)}"
                         for file, s, rows in chosen)
        return text, [ok(rows) for _, _, rows in chosen]

    lines.append(row("LIFT accuracy ≥ full fine-tuning's − 1 point", *per_run(
        ("lift", "full"), lambda x: f"{accuracy(x['lift']):.3f} vs full {accuracy(x['full']):.3f}",
        lambda x: accuracy(x["lift"]) >= accuracy(x["full"]) - 0.01 - 1e-9)))
    lines.append(row("LIFT retention: ΔPPL ≤ 0.5 × full's", *per_run(
        ("lift", "full"), lambda x: f"{delta_ppl(x['lift'], x):+.3f} vs full {delta_ppl(x['full'], x):+.3f}",
        lambda x: delta_ppl(x["lift"], x) <= 0.5 * delta_ppl(x["full"], x))))
    share = lambda x: x["lift"]["optimizer_state_bytes"] / x["full"]["optimizer_state_bytes"]  # noqa: E731
    lines.append(row("LIFT optimizer state ≤ 6 % of full's", *per_run(
        ("lift", "full"), lambda x: f"{x['lift']['optimizer_state_bytes'] / 1e6:.1f} MB vs "
                                    f"{x['full']['optimizer_state_bytes'] / 1e6:.1f} MB: {share(x):.1%}",
        lambda x: share(x) <= 0.06)))
    lines.append(row("LIFT accuracy ≥ LoRA's", *per_run(
        ("lift", "lora"), lambda x: f"{accuracy(x['lift']):.3f} vs LoRA {accuracy(x['lora']):.3f}",
        lambda x: accuracy(x["lift"]) >= accuracy(x["lora"]))))
    rss = lambda x: x["lift"]["train"]["peak_rss_mb"] / x["lora"]["train"]["peak_rss_mb"]  # noqa: E731
    lines.append(row("LIFT peak RSS ≤ 1.15 × LoRA's", *per_run(
        ("lift", "lora"), lambda x: f"{x['lift']['train']['peak_rss_mb']:.0f} MB vs "
                                    f"{x['lora']['train']['peak_rss_mb']:.0f} MB: {rss(x):.2f}×",
        lambda x: rss(x) <= 1.15)))

    dense = [(file, data["rows"]["lift"]) for file, data in loaded("tune*.json")
             if data.get("settings", {}).get("density") == 0.05 and "lift" in data.get("rows", {})
             and data["rows"]["lift"].get("result_bytes") and data["rows"]["lift"].get("model_params")]
    fractions = [(file, r["result_bytes"], r["result_bytes"] / (2 * r["model_params"])) for file, r in dense]
    lines.append(row("patch ≤ 1/15 of the fp16 model at density 5 %",
                     "; ".join(f"{file}: {size / 1e6:.2f} MB: 1/{1 / f:.1f}" for file, size, f in fractions),
                     [f <= 1 / 15 for _, _, f in fractions]))
    return lines


def main() -> None:
    print("Calibrated quantization targets\n\n" + "\n".join(quantization())
          + "\n\nFine-tuning targets\n\n" + "\n".join(fine_tuning()))


if __name__ == "__main__":
    main()
