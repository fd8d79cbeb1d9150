"""The command line: success paths on tiny models, every user error → one line, exit 2, no output."""

import json
import sys

import pytest
import torch

from conftest import tiny_model
from weightwise.cli import main


def run_cli(capsys, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["weightwise", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(result, message, output):
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert "Traceback" not in err
    assert not output.exists()


def test_formats_lists_every_named_format(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "formats")
    assert code == 0
    for name in ("int4", "int3_asym", "fp8_e4m3", "fp4_e2m1", "nf4", "ternary", "mxfp4", "mxint8"):
        assert name in out


def test_quantize_then_eval_on_a_tiny_model(capsys, monkeypatch, tiny_dir, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--format", "nf4", "--group-size", "32", "-o", run)
    assert code == 0, err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recipe"]["format"] == "nf4" and len(manifest["layers"]) == 14
    assert manifest["source"]["path"] and manifest["metrics"]["size"]["bits_per_weight"] == pytest.approx(4.5)
    report = tmp_path / "report"
    code, out, err = run_cli(capsys, monkeypatch, "eval", run, tiny_dir, "--reference", tiny_dir, "--window", "64",
                             "--max-tokens", "256", "--batch-size", "2", "-o", report)
    assert code == 0, err
    metrics = json.loads((report / "metrics.json").read_text())
    assert [r["name"] for r in metrics["runs"]] == [str(run), str(tiny_dir)]
    quantized, source = metrics["runs"]
    assert quantized["kl_mean"] > 0 and source["kl_mean"] == pytest.approx(0, abs=1e-4)
    assert source["top1_agreement"] == 1 and quantized["n_windows"] == 4
    assert (report / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(run) in (report / "report.md").read_text()


def test_yaml_recipe_with_cli_override(capsys, monkeypatch, tiny_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("format: int4\ngroup_size: 16\noverrides:\n  - pattern: down_proj$\n    format: fp8_e4m3\n")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--config", recipe, "--group-size", "32", "-o", run)
    assert code == 0, err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recipe"]["group_size"] == 32
    assert manifest["layers"]["model.layers.0.mlp.down_proj"]["spec"]["format"] == "fp8_e4m3"


def test_missing_model_file(capsys, monkeypatch, tmp_path):
    out = tmp_path / "out"
    assert_user_error(run_cli(capsys, monkeypatch, "quantize", tmp_path / "nope.gguf", "-o", out), "not found", out)


def test_truncated_gguf(capsys, monkeypatch, tmp_path):
    from weightwise.io.defaults import default_gguf_path

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(default_gguf_path().read_bytes()[:4096])
    out = tmp_path / "out"
    assert_user_error(run_cli(capsys, monkeypatch, "quantize", bad, "-o", out), "truncated", out)


def test_truncated_safetensors(capsys, monkeypatch, tiny_dir, tmp_path):
    weights = tiny_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    out = tmp_path / "out"
    assert_user_error(run_cli(capsys, monkeypatch, "quantize", tiny_dir, "-o", out), "truncated", out)


def test_unknown_format(capsys, monkeypatch, tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert_user_error(run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--format", "int17", "-o", out), "unknown format 'int17'", out)


def test_group_size_that_does_not_divide(capsys, monkeypatch, tmp_path):
    folder = tmp_path / "m48"
    tiny_model(hidden_size=48, intermediate_size=80).save_pretrained(folder)
    out = tmp_path / "out"
    result = run_cli(capsys, monkeypatch, "quantize", folder, "--format", "int4", "--group-size", "32", "-o", out)
    assert_user_error(result, "group size 32 does not divide the row length 48", out)


def test_nan_weights(capsys, monkeypatch, tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[3, 3] = float("nan")
    folder = tmp_path / "nan"
    model.save_pretrained(folder)
    out = tmp_path / "out"
    assert_user_error(run_cli(capsys, monkeypatch, "quantize", folder, "-o", out), "NaN", out)


def test_unsupported_architecture(capsys, monkeypatch, tmp_path):
    folder = tmp_path / "odd"
    tiny_model().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "frobnicator"
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_user_error(run_cli(capsys, monkeypatch, "quantize", folder, "-o", out), "frobnicator", out)


def test_invalid_recipe_file(capsys, monkeypatch, tiny_dir, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("format: int4\ngroupsize: 64\n")
    out = tmp_path / "out"
    assert_user_error(run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--config", recipe, "-o", out), "groupsize", out)


def test_eval_text_file_errors(capsys, monkeypatch, tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert_user_error(run_cli(capsys, monkeypatch, "eval", tiny_dir, "--text", tmp_path / "none.txt", "-o", out), "not found", out)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert_user_error(run_cli(capsys, monkeypatch, "eval", tiny_dir, "--text", short, "-o", out), "fewer than one window", out)


@pytest.mark.slow
def test_end_to_end_on_the_default_model(capsys, monkeypatch, tmp_path, default_model):
    run = tmp_path / "w4"
    code, out, err = run_cli(capsys, monkeypatch, "quantize", "default", "--format", "int4", "--group-size", "64", "-o", run)
    assert code == 0, err
    assert "layers quantized" in out and (run / "tokenizer.json").is_file()
    report = tmp_path / "eval"
    code, out, err = run_cli(capsys, monkeypatch, "eval", run, "--reference", "default", "--max-tokens", "1024", "-o", report)
    assert code == 0, err
    (row,) = json.loads((report / "metrics.json").read_text())["runs"]
    assert row["n_tokens_scored"] == 2 * 511 and row["format"] == "int4 g64"
    assert row["bits_per_weight"] == pytest.approx(4.25)
    assert row["reference_ppl"] < row["ppl"] < 3 * row["reference_ppl"]
    assert 0 < row["kl_mean"] < 1 and 0.5 < row["top1_agreement"] < 1


def test_gptq_with_calibration_file_and_size_target(capsys, monkeypatch, tiny_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text for the tiny model. " * 30)
    run = tmp_path / "gptq"
    code, out, err = run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--method", "gptq", "--format", "int4", "--group-size", "32",
                             "--lorc-rank", "2", "--calib", f"{text}:8x32", "--true-sequential", "--bias-correction",
                             "--block-tune", "--device", "cpu", "-o", run)
    assert code == 0, err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and "on cpu" in out
    assert manifest["calibration"]["tokens"] == 256 and manifest["recipe"]["method"]["name"] == "gptq"
    assert manifest["recipe"]["calibration"] == {"source": str(text), "samples": 8, "seq_len": 32, "seed": 0, "batch_size": 8,
                                                 "true_sequential": True}
    assert manifest["recipe"]["bias_correction"] is True
    assert manifest["recipe"]["block_tune"] == {"epochs": 8, "lr": 1e-3, "tune_norms": True, "seed": 0}
    assert all("block_tune" in layer for layer in manifest["layers"].values())
    assert not (tmp_path / ".gptq.partial").exists()
    planned = tmp_path / "planned"
    code, out, err = run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--target-bpw", "4", "--calib", f"{text}:8x32", "-o", planned)
    assert code == 0, err
    assert "mixed: " in out and "budget" in out  # the real per-layer formats, not the unused --format
    assert json.loads((planned / "manifest.json").read_text())["plan"]["bits_per_weight"] <= 4


def test_demo_rejects_an_invalid_eval_config(capsys, monkeypatch, tmp_path):
    bad = tmp_path / "eval.yaml"
    bad.write_text("window: 1\n")
    out = tmp_path / "demo"
    assert_user_error(run_cli(capsys, monkeypatch, "demo", "--config", bad, "-o", out), "window", out)


def test_demo_rejects_a_bad_recipe(capsys, monkeypatch, tmp_path):
    out = tmp_path / "demo"
    assert_user_error(run_cli(capsys, monkeypatch, "demo", "--format", "int4:32:magic", "-o", out), "unknown method", out)
    assert_user_error(run_cli(capsys, monkeypatch, "demo", "--format", "int4:x", "-o", out), "must be an integer", out)


def test_quantize_device_errors(capsys, monkeypatch, tiny_dir, tmp_path):
    out = tmp_path / "q"
    assert_user_error(run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--device", "tpu", "-o", out), "use auto, cpu or cuda", out)
    if not torch.cuda.is_available():
        assert_user_error(run_cli(capsys, monkeypatch, "quantize", tiny_dir, "--device", "cuda", "-o", out), "no GPU is visible", out)
