"""Quantization shared by several processes: the same `weightwise quantize` command on two CPU processes under
torchrun (gloo) ends with what one process makes, within the tolerance the GPU tests allow (summation order differs:
a few codes may round the other way, the output error may not move); and the pieces it is built from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from weightwise.comm import Comm
from weightwise.errors import WeightwiseError
from weightwise.io.folders import load_quantized
from weightwise.quantize import QuantizedLinear
from weightwise.quantize.api import share_layers
from weightwise.quantize.calibration import process_share

TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_each_process_takes_every_world_th_batch_and_together_they_take_all():
    tokens = torch.arange(11 * 3).view(11, 3)  # batches of 4 rows: 4, 4, 3
    shares = [process_share(tokens, 4, Comm(rank=r, world=2)) for r in range(2)]
    assert torch.equal(shares[0], torch.cat([tokens[0:4], tokens[8:11]])) and torch.equal(shares[1], tokens[4:8])
    assert process_share(tokens, 4, Comm()) is tokens
    with pytest.raises(WeightwiseError, match="3 batches of 4 sequences, fewer than the 4 processes"):
        process_share(tokens, 4, Comm(rank=0, world=4))


def test_layers_are_shared_by_gptq_cost_largest_first():
    shapes = {"q": torch.Size([64, 64]), "k": torch.Size([16, 64]), "v": torch.Size([16, 64]),
              "down": torch.Size([64, 256]), "up": torch.Size([256, 64])}
    owners = share_layers(shapes, 2)
    assert owners["down"] == 0 and {owners[n] for n in ("q", "k", "v", "up")} == {1}  # 64·256² outweighs the rest
    assert share_layers(shapes, 2) == owners and set(share_layers(shapes, 1).values()) == {0}
    assert sorted(share_layers(dict.fromkeys("abcd", torch.Size([8, 8])), 2).values()) == [0, 0, 1, 1]


def _codes(run: Path) -> dict[str, QuantizedLinear]:
    model, _ = load_quantized(run)
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def _output_mse(source: Path, run: Path, tokens: torch.Tensor) -> float:
    model, _ = load_quantized(run)
    with torch.no_grad():
        return (tiny_model()(tokens).logits - model(tokens).logits).pow(2).mean().item()


@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torch's launcher is not installed beside this Python")
@pytest.mark.parametrize("options", [["--method", "gptq", "--true-sequential", "--lorc-rank", "2", "--bias-correction"],
                                     ["--method", "awq", "--no-stream"],
                                     ["--method", "rtn"]], ids=["gptq-lorc-streamed", "awq-in-memory", "rtn"])
def test_two_processes_quantize_as_one(options, tiny_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text for the tiny model, in two processes or one. " * 30)
    args = ["quantize", tiny_dir, "--format", "int4", "--group-size", "32", "--calib", f"{text}:16x32", *options,
            "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads per process: the same kernels' summation order
    alone = subprocess.run([sys.executable, "-m", "weightwise.cli", *map(str, args), "-o", str(one)],
                           capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "weightwise.cli",
                           *map(str, args), "-o", str(two)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("layers quantized") == 1  # process 0 alone reports
    assert not any(p.name.startswith(".two") for p in tmp_path.iterdir())  # no checkpoint or lock left behind

    manifests = {run: json.loads((run / "manifest.json").read_text()) for run in (one, two)}
    assert list(manifests[two]["layers"]) == list(manifests[one]["layers"])  # same layers, in the same order
    assert manifests[two]["recipe"] == manifests[one]["recipe"]
    assert manifests[two]["calibration"] == manifests[one]["calibration"]
    singles, shared = _codes(one), _codes(two)
    assert all(singles[n].spec == shared[n].spec for n in singles)
    held_out = torch.randint(1, 96, (4, 32), generator=torch.Generator().manual_seed(2))
    single_error, shared_error = _output_mse(tiny_dir, one, held_out), _output_mse(tiny_dir, two, held_out)
    assert shared_error == pytest.approx(single_error, rel=0.1), (single_error, shared_error)
    same = sum(torch.equal(singles[n].packed_codes, shared[n].packed_codes) for n in singles)
    assert same >= len(singles) // 2, f"only {same}/{len(singles)} layers have identical codes"
    if options[1] == "rtn":  # no statistics to sum: the very same tensors (LoRC's SVD is left out: LAPACK's result
        # may change with the buffer's alignment, in one process too)
        assert same == len(singles)
        assert all(torch.equal(a, b) for n in singles
                   for a, b in zip(singles[n].state_dict().values(), shared[n].state_dict().values()))


def test_block_tuning_is_refused_on_several_processes():
    from weightwise.quantize import quantize

    recipe = {"format": "int4", "group_size": 32, "method": "gptq", "block_tune": {"epochs": 1},
              "calibration": {"samples": 4, "seq_len": 16, "batch_size": 2}}
    with pytest.raises(WeightwiseError, match="block tuning does not run on several processes"):
        quantize(tiny_model(), recipe, calibration=torch.randint(1, 96, (4, 16)), comm=Comm(rank=0, world=2))
