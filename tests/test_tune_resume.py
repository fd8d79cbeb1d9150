"""A `weightwise tune` process killed (SIGKILL) after its first checkpoint; the same command run again resumes
and ends with exactly the result of an uninterrupted run (a LIFT patch; a qat quantized run). A resumed run reports
the run's first loss; a run killed just before its manifest leaves no checkpoints behind."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from test_qat import assert_same_tensors
from test_tune import quick, run_cli, toy_lift_command
from weightwise.tune.api import tune
from weightwise.tune.patch import WeightPatch


def killed_after_first_checkpoint(args: list, out, log) -> int:
    """Run `weightwise` with ``args`` writing to ``out`` in a process killed once a checkpoint exists; returns the
    steps it logged."""
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "weightwise.cli", *map(str, args), "-o", str(out)],
                                stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not list(out.glob("checkpoints/step-*/state.json")):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists(), "the run finished before it was killed: make it longer"
    return len((out / "metrics.jsonl").read_text().splitlines())


def test_killed_run_resumes_to_the_uninterrupted_weights(capsys, monkeypatch, tiny_dir, tmp_path):
    args = toy_lift_command(tiny_dir, tmp_path, steps=12, refresh_every=3)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    code, _, err = run_cli(capsys, monkeypatch, *args, "-o", reference)
    assert code == 0, err
    assert killed_after_first_checkpoint(args, killed, tmp_path / "killed.log") < 12

    code, _, err = run_cli(capsys, monkeypatch, *args, "-o", killed)
    assert code == 0, err
    resumed_at = json.loads((killed / "metrics.json").read_text())["resumed_from_step"]
    assert resumed_at >= 2 and resumed_at % 2 == 0 and f"resumed from step {resumed_at}" in err
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    ours, theirs = (WeightPatch.load(run / "patch.safetensors") for run in (killed, reference))
    assert ours.entries.keys() == theirs.entries.keys() and len(ours.entries) == 14
    for name, (idx, values) in theirs.entries.items():
        assert torch.equal(ours.entries[name][0], idx), name  # same union of masks
        assert torch.equal(ours.entries[name][1], values), name  # bit-identical fp32 deltas
    assert not (killed / "checkpoints").exists()


def test_killed_qat_run_resumes_to_the_uninterrupted_quantized_run(capsys, monkeypatch, tiny_dir, tmp_path):
    args = [*toy_lift_command(tiny_dir, tmp_path, steps=16, refresh_every=3)[:4], "--method", "qat", "--format",
            "int2_asym", "--group-size", "32", "--train-examples", "16", "--batch-size", "4", "--grad-accum", "2",
            "--steps", "16", "--checkpoint-every", "2", "--test-examples", "0", "--retention-max-tokens", "0",
            "--lr", "0.005"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    code, out, err = run_cli(capsys, monkeypatch, *args, "-o", reference)
    assert code == 0, err
    assert "qat" in out and "model" in out
    assert killed_after_first_checkpoint(args, killed, tmp_path / "killed.log") < 16

    code, _, err = run_cli(capsys, monkeypatch, *args, "-o", killed)
    assert code == 0, err
    assert "resumed from step" in err
    logs = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (reference, killed)]
    keys = ("step", "loss", "qat_oscillating", "qat_frozen")
    assert [[r[k] for k in keys] for r in logs[0]] == [[r[k] for k in keys] for r in logs[1]]
    assert_same_tensors(killed / "model", reference / "model")
    assert not (killed / "checkpoints").exists()


class _Killed(Exception):
    pass


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a}", "response": str(2 * a)}) + "\n" for a in range(11, 19)))
    return str(path)


def test_a_resumed_run_reports_the_runs_first_loss(task, tmp_path):
    config = quick(task, max_steps=6, checkpoint_every=2, batch_size=4)
    expected = tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "a")

    def kill_at_checkpoint(phase, done, total, info):
        if info.get("event") == "checkpoint":
            raise _Killed

    with pytest.raises(_Killed):
        tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "b", progress=kill_at_checkpoint)
    metrics = tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "b")
    assert metrics["resumed_from_step"] == 2 and metrics["train"]["steps_run"] == 4
    assert metrics["train"]["loss_first"] == expected["train"]["loss_first"]
    assert metrics["train"]["loss_last"] == expected["train"]["loss_last"]
    # the patch carries the headline metrics too: the same bytes
    assert (tmp_path / "b" / "patch.safetensors").read_bytes() == (tmp_path / "a" / "patch.safetensors").read_bytes()


def test_a_run_killed_before_its_manifest_keeps_no_checkpoints(task, tmp_path, monkeypatch):
    config = quick(task, max_steps=4, checkpoint_every=2, batch_size=4)
    tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "a")

    def killed(*args, **kwargs):
        raise _Killed

    with monkeypatch.context() as patched:
        patched.setattr("weightwise.tune.api.write_manifest", killed)
        with pytest.raises(_Killed):
            tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "b")
    assert not (tmp_path / "b" / "checkpoints").exists() and not (tmp_path / "b" / "manifest.json").exists()
    tune(tiny_model(), tiny_tokenizer(), config, tmp_path / "b")  # runs again from the start
    assert (tmp_path / "b" / "patch.safetensors").read_bytes() == (tmp_path / "a" / "patch.safetensors").read_bytes()
    assert not (tmp_path / "b" / "checkpoints").exists()
