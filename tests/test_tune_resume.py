"""A `weightwise tune` process killed (SIGKILL) after its first checkpoint; the same command run again resumes
and ends with exactly the weights of an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time

import torch

from test_tune import run_cli, toy_lift_command
from weightwise.tune.patch import WeightPatch


def test_killed_run_resumes_to_the_uninterrupted_weights(capsys, monkeypatch, tiny_dir, tmp_path):
    args = toy_lift_command(tiny_dir, tmp_path, steps=12, refresh_every=3)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    code, _, err = run_cli(capsys, monkeypatch, *args, "-o", reference)
    assert code == 0, err

    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "weightwise.cli", *map(str, args), "-o", str(killed)],
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not list(killed.glob("checkpoints/step-*/state.json")):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "manifest.json").exists(), "the run finished before it was killed: make it longer"
    done_before_kill = len((killed / "metrics.jsonl").read_text().splitlines())
    assert done_before_kill < 12

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
