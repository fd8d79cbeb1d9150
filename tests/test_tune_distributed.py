"""The same `weightwise tune` command on two CPU processes (`accelerate launch --multi_gpu --num_processes 2`,
which starts them through torch's launcher; `--cpu` would need mpirun for more than one), over gloo: the processes
keep identical masks and weights (the run checks it and fails otherwise) and end close to a single process
that ran the same global batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from test_tune import run_cli, toy_lift_command
from weightwise.tune.patch import WeightPatch

ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.mark.skipif(not ACCELERATE.is_file(), reason="accelerate's launcher is not installed beside this Python")
def test_two_cpu_processes_match_one(capsys, monkeypatch, tiny_dir, tmp_path):
    args = toy_lift_command(tiny_dir, tmp_path, steps=5, refresh_every=2)
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run_cli(capsys, monkeypatch, *args, "-o", one)
    assert code == 0, err

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "weightwise.cli", *map(str, args),
                           "--device", "cpu", "-o", str(two)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert log.count("masks refreshed") == 2 and log.count("step 5/5 loss") == 1  # process 0 alone reports
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["train"]["steps"] == 5
    single = json.loads((one / "metrics.json").read_text())
    assert metrics["train"]["loss_last"] == pytest.approx(single["train"]["loss_last"], rel=1e-4)

    tuned = {}
    for run in (one, two):
        model = tiny_model()
        WeightPatch.load(run / "patch.safetensors").apply(model)
        tuned[run] = model.state_dict()
    for name, tensor in tuned[one].items():
        torch.testing.assert_close(tuned[two][name], tensor, atol=1e-5, rtol=0)
    masks = {run: {n: i for n, (i, _) in WeightPatch.load(run / "patch.safetensors").entries.items()} for run in (one, two)}
    assert masks[one].keys() == masks[two].keys()
    same = sum(torch.equal(masks[one][n], masks[two][n]) for n in masks[one])
    assert same == len(masks[one])  # the union of all masks, refreshes included, as in one process
