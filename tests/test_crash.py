"""Crash safety: commands killed with SIGKILL at random moments and run again end with exactly the uninterrupted
output and never show a partial one (a few trials of bench/crash.py's harness, which bench/crash.py runs at scale).
The fixes it led to are tested beside their modules (test_io.py: identical safetensors bytes, killed writers'
temporaries; test_tune_resume.py: a resumed run's first loss, checkpoints gone before the manifest); two processes
writing one output at once are refused in test_trust.py (test_cli_writers_refuse_a_locked_output)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import bench_module, tiny_model, tiny_tokenizer
from test_cli import run_cli
from weightwise.io.folders import save


@pytest.fixture(scope="module")
def crash():
    """bench/crash.py as a module."""
    return bench_module("crash")


@pytest.fixture(scope="module")
def inputs(crash, tmp_path_factory):
    return crash.build_fixture(tmp_path_factory.mktemp("crash"), hidden=128, layers=4)


def killed_and_rerun(crash, command, inputs, ref, folder, kill_after, armed=None):
    """Run ``command`` into ``folder/OUT``, SIGKILL it ``kill_after`` s after its lock (or ``armed()``), run it
    again; returns (killed run, rerun, output)."""
    out = folder / crash.output_name(command)
    folder.mkdir()
    killed = crash.run_once(command, inputs, out, ref, kill_after, folder / "log.txt", armed=armed)
    rerun = crash.run_once(command, inputs, out, ref, None, folder / "log.txt")
    assert rerun.returncode == 0, (folder / "log.txt").read_text()
    return killed, rerun, out


def reference(crash, command, inputs, folder, capsys, monkeypatch) -> Path:
    """The uninterrupted output, written by the CLI in this process."""
    folder.mkdir()
    out = folder / crash.output_name(command)
    code, _, err = run_cli(capsys, monkeypatch, *crash.command_args(command, inputs, out))
    assert code == 0, err
    return out


def test_killed_gptq_quantization_resumes_to_the_uninterrupted_run(crash, inputs, capsys, monkeypatch, tmp_path):
    ref = reference(crash, "quantize", inputs, tmp_path / "ref", capsys, monkeypatch)
    out = tmp_path / "trial" / "out"
    killed, rerun, out = killed_and_rerun(crash, "quantize", inputs, ref, tmp_path / "trial", random.Random(0).uniform(0, 0.03),
                                          armed=lambda: crash.resumable("quantize", out))
    assert killed.killed and rerun.resumable_before  # killed after its first block, so the rerun resumed
    assert json.loads((out / "manifest.json").read_text())["calibration"]["resumed_at_block"] >= 1
    assert killed.partial == [] and rerun.partial == []
    assert crash.compare_outputs("quantize", out, ref) == []  # byte for byte, but its date, time and resume point
    assert crash.leftovers("quantize", out) == []  # no lock, no block checkpoints, no temporary folder


def test_killed_gguf_export_ends_with_the_same_file_and_nothing_beside_it(crash, inputs, capsys, monkeypatch, tmp_path):
    ref = reference(crash, "export", inputs, tmp_path / "ref", capsys, monkeypatch)
    killed, rerun, out = killed_and_rerun(crash, "export", inputs, ref, tmp_path / "trial", random.Random(1).uniform(0, 0.1))
    assert killed.partial == [] and rerun.partial == []
    assert crash.compare_outputs("export", out, ref) == []  # the .gguf byte for byte, its .json report too
    assert crash.leftovers("export", out) == []  # no lock, no temporary file of the killed run


def test_killed_selection_resumes_from_its_score_cache_to_the_same_output(crash, inputs, capsys, monkeypatch, tmp_path):
    ref = reference(crash, "select", inputs, tmp_path / "ref", capsys, monkeypatch)
    out = tmp_path / "trial" / "out"
    killed, rerun, out = killed_and_rerun(crash, "select", inputs, ref, tmp_path / "trial", random.Random(2).uniform(0, 0.02),
                                          armed=lambda: crash.resumable("select", out))
    assert killed.killed and rerun.resumable_before  # killed with scores cached, so the rerun reused them
    assert sum(s["reused_from_cache"] or 0 for s in json.loads((out / "manifest.json").read_text())["scoring"].values()) > 0
    assert killed.partial == [] and rerun.partial == []
    assert crash.compare_outputs("select", out, ref) == []  # scores, keep/drop and reasons identical; timings aside
    assert crash.leftovers("select", out) == []  # the score cache is gone once the output is whole
    report = (out / "report.md").read_text()  # another run's timings change the report's size, not its wholeness
    (out / "report.md").write_text(report.replace(" s).", "0 s).", 1))
    assert crash.partial_outputs("select", out, ref) == [] and crash.compare_outputs("select", out, ref) == []
    (out / "report.md").write_text(report[: len(report) // 2])
    assert crash.partial_outputs("select", out, ref) == ["out/report.md: other lines than the reference's"]


def test_killed_streamed_gguf_export_ends_with_the_same_file(crash, inputs, capsys, monkeypatch, tmp_path):
    ref = reference(crash, "export-stream", inputs, tmp_path / "ref", capsys, monkeypatch)
    assert ref.read_bytes() == (reference(crash, "export", inputs, tmp_path / "whole", capsys, monkeypatch)).read_bytes()
    killed, rerun, out = killed_and_rerun(crash, "export-stream", inputs, ref, tmp_path / "trial", random.Random(3).uniform(0, 0.1))
    assert killed.partial == [] and rerun.partial == []
    assert crash.compare_outputs("export-stream", out, ref) == []
    assert crash.leftovers("export-stream", out) == []  # nor the killed run's data file beside the output


def test_killed_qat_tune_resumes_to_the_same_quantized_run(crash, inputs, capsys, monkeypatch, tmp_path):
    ref = reference(crash, "tune-qat", inputs, tmp_path / "ref", capsys, monkeypatch)
    out = tmp_path / "trial" / "out"
    killed, rerun, out = killed_and_rerun(crash, "tune-qat", inputs, ref, tmp_path / "trial", random.Random(4).uniform(0, 0.05),
                                          armed=lambda: crash.resumable("tune-qat", out))
    assert killed.killed and rerun.resumable_before  # killed after a checkpoint, so the rerun resumed from it
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] >= 2
    assert killed.partial == [] and rerun.partial == []
    assert crash.compare_outputs("tune-qat", out, ref) == []  # the packed codes and scales byte for byte
    assert crash.leftovers("tune-qat", out) == []


def test_harness_sees_a_partial_output(crash, inputs, tmp_path):
    """The check that the trials rely on finds a folder missing a file and a cut-short file."""
    ref = tmp_path / "ref" / "out"
    save(tiny_model(), ref, tokenizer=tiny_tokenizer())
    out = tmp_path / "trial" / "out"
    save(tiny_model(), out, tokenizer=tiny_tokenizer())
    assert crash.partial_outputs("patch", out, ref) == []
    (out / "config.json").unlink()
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    found = crash.partial_outputs("patch", out, ref)
    assert any("config.json: missing" in f for f in found) and any("model.safetensors: unreadable" in f for f in found)
