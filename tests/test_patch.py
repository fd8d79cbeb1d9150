"""Sparse weight patches: index/value codecs, file round trips, exact apply/remove, compose, folders, CLI, size."""

import json
import shutil

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import assert_user_error, run_cli

from weightwise.errors import WeightwiseError
from weightwise.io.artifacts import read_manifest, state_dict_fingerprint
from weightwise.io.models import load_model
from weightwise.tune.patch import (
    VALUE_DTYPES,
    WeightPatch,
    compose,
    decode_indices,
    decode_values,
    encode_indices,
    encode_values,
)


def perturb(model, density=0.05, magnitude=1e-2, seed=1, pattern="proj"):
    """Change a random `density` of the entries of every weight whose name holds `pattern`, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if pattern in name:
                flat = param.view(-1)
                idx = torch.randperm(flat.numel(), generator=g)[: max(1, int(density * flat.numel()))]
                flat[idx] += torch.randn(idx.numel(), generator=g) * magnitude
    return model


def make_patch(seed=1, density=0.05, magnitude=1e-2, pattern="proj", base_seed=0):
    base = tiny_model(base_seed)
    tuned = perturb(tiny_model(base_seed), density, magnitude, seed, pattern)
    meta = {"base_model_hash": state_dict_fingerprint(base), "method": "random", "density": density, "metrics": {"loss": 1.5}}
    return base, tuned, WeightPatch.from_models(base.state_dict(), tuned.state_dict(), meta)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- codecs --------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(gaps=st.lists(st.one_of(st.integers(0, 300), st.integers(0, 70_000), st.integers(0, 2**34)), min_size=0, max_size=200))
def test_index_codec_round_trips_any_sorted_set(gaps):
    idx = torch.cumsum(torch.tensor(gaps, dtype=torch.int64) + 1, 0) - 1
    stream, escapes = encode_indices(idx)
    assert stream.dtype in (torch.uint8, torch.uint16, torch.uint32)
    assert torch.equal(decode_indices(stream, escapes), idx)


def test_index_codec_width_and_escapes():
    dense = torch.arange(0, 20_000, 7)  # gaps of 6 → one byte each
    stream, escapes = encode_indices(dense)
    assert stream.dtype == torch.uint8 and escapes is None
    with_jump = torch.cat([dense, torch.tensor([10**9])])  # one long gap: an escape, not a wider stream
    stream, escapes = encode_indices(with_jump)
    assert stream.dtype == torch.uint8 and escapes.numel() == 1 and escapes.dtype == torch.uint32
    spread = torch.arange(0, 3_000_000, 1000)  # every gap needs 16 bits: widen instead of escaping all
    stream, escapes = encode_indices(spread)
    assert stream.dtype == torch.uint16 and escapes is None
    with pytest.raises(ValueError, match="escape"):
        decode_indices(encode_indices(with_jump)[0], None)


# --- building, files -------------------------------------------------------------------------------


def test_from_models_finds_exactly_the_changed_entries():
    base, tuned, patch = make_patch(pattern="")  # every tensor, tied embeddings included
    b, t = base.state_dict(), tuned.state_dict()
    changed = {k for k in b if not torch.equal(b[k], t[k])}
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert set(patch.entries) == changed - {"model.embed_tokens.weight"}  # the tied pair once
    for name, (idx, delta) in patch.entries.items():
        assert torch.equal(idx, torch.nonzero(t[name].view(-1) != b[name].view(-1)).view(-1))
        assert torch.equal(delta, t[name].view(-1)[idx] - b[name].view(-1)[idx])
    with pytest.raises(WeightwiseError, match="base_model_hash"):
        WeightPatch.from_models(b, t, {"method": "x"})


@pytest.mark.parametrize("value_dtype", list(VALUE_DTYPES))
def test_file_round_trip(tmp_path, value_dtype):
    _, _, patch = make_patch()
    path = patch.save(tmp_path / "p.safetensors", value_dtype)
    loaded = WeightPatch.load(path)
    assert loaded.metadata == patch.metadata and loaded.shapes == patch.shapes
    info = loaded.info()
    assert info["value_dtype"] == value_dtype and info["file_bytes"] == path.stat().st_size
    assert info["entries"] == sum(i.numel() for i, _ in patch.entries.values())
    for name, (idx, values) in patch.entries.items():
        got_idx, got = loaded.entries[name]
        assert torch.equal(got_idx, idx)
        if value_dtype == "int8":
            scale = values.abs().max() / 127
            assert (got - values).abs().max() <= scale / 2 * (1 + 1e-6)
        else:  # exact up to the storage dtype's own rounding
            assert torch.equal(got, values.to(VALUE_DTYPES[value_dtype]).float())


def test_damaged_files_are_refused_with_one_line(tmp_path):
    _, _, patch = make_patch()
    data = patch.to_bytes("fp16")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(WeightwiseError, match="truncated or corrupt"):
        WeightPatch.load(cut)
    flipped = bytearray(data)
    flipped[-5] ^= 0x40
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(WeightwiseError, match="checksum"):
        WeightPatch.load(bad)
    model_file = tmp_path / "model.safetensors"
    tiny_model().save_pretrained(tmp_path / "m")
    model_file.write_bytes((tmp_path / "m" / "model.safetensors").read_bytes())
    with pytest.raises(WeightwiseError, match="not a weightwise patch"):
        WeightPatch.load(model_file)
    with pytest.raises(WeightwiseError, match="not found"):
        WeightPatch.load(tmp_path / "none.safetensors")
    with pytest.raises(WeightwiseError, match="unknown patch value dtype"):
        patch.save(tmp_path / "x.safetensors", "fp8")


def test_fp16_overflow_is_refused(tmp_path):
    patch = WeightPatch({"w": (torch.tensor([0, 3]), torch.tensor([1.0, 1e6]))}, {"w": (2, 2)}, {"base_model_hash": "h"})
    with pytest.raises(WeightwiseError, match="fp16 range"):
        patch.save(tmp_path / "p.safetensors", "fp16")
    assert not (tmp_path / "p.safetensors").exists()
    assert WeightPatch.from_bytes(patch.to_bytes("bf16")).entries["w"][1][1] == 1e6 - 1e6 % 4096


# --- apply / remove ---------------------------------------------------------------------------------


def test_apply_gives_the_tuned_model_and_remove_restores_bit_exactly():
    base, tuned, patch = make_patch()
    before = weights(base)
    undo = patch.apply(base)
    t = tuned.state_dict()
    for name, value in base.state_dict().items():
        assert torch.equal(value, t[name]), name  # Δ = tuned − base is exact here; the sum rounds back to tuned
    patch.remove(base, undo=undo)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert state_dict_fingerprint(base) == patch.base_model_hash


def test_remove_without_undo_is_within_one_ulp_and_the_undo_record_is_needed():
    base, _, patch = make_patch(magnitude=0.05)
    before = weights(base)
    patch.apply(base, scale=0.3)
    patched = weights(base)
    patch.remove(base, scale=0.3)
    inexact = 0
    for name, (idx, _) in patch.entries.items():
        got, want = base.state_dict()[name].view(-1)[idx], before[name].view(-1)[idx]
        larger = torch.maximum(want.abs(), patched[name].view(-1)[idx].abs())
        ulp = torch.nextafter(larger, torch.tensor(float("inf"))) - larger  # two roundings of half an ulp each
        assert ((got - want).abs() <= ulp).all()
        inexact += int((got != want).sum())
    assert inexact > 0  # why apply() returns an undo record: plain subtraction is not an exact inverse


def test_scale_half_halves_the_change():
    base, _, patch = make_patch()
    before = weights(base)
    patch.apply(base, scale=0.5)
    for name, (idx, delta) in patch.entries.items():
        change = base.state_dict()[name].view(-1)[idx] - before[name].view(-1)[idx]
        torch.testing.assert_close(change, 0.5 * delta, rtol=0, atol=1e-7)
    with pytest.raises(WeightwiseError, match="scale 0.5, not 1.0"):
        patch.remove(base, scale=1.0, undo=patch.apply(tiny_model(0), scale=0.5))


def test_hash_mismatch_is_refused_unless_forced():
    _, _, patch = make_patch()
    other = tiny_model(seed=7)
    before = weights(other)
    with pytest.raises(WeightwiseError, match="made for base model"):
        patch.apply(other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing changed
    undo = patch.apply(other, force=True)
    name = next(iter(patch.entries))
    assert not torch.equal(other.state_dict()[name], before[name])
    patch.remove(other, undo=undo)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_quantized_or_foreign_targets_are_errors():
    from weightwise.quantize.api import quantize

    base, _, patch = make_patch()
    qmodel = quantize(base, {"format": "int4", "group_size": 32})
    with pytest.raises(WeightwiseError, match="QuantizedLinear"):
        patch.apply(qmodel, force=True)
    wider = tiny_model(intermediate_size=128)
    with pytest.raises(WeightwiseError, match="shape"):
        patch.apply(wider, force=True)


# --- compose ---------------------------------------------------------------------------------------


def test_compose_sums_overlaps_and_reports_them():
    shape = {"w": (4, 5)}
    a = WeightPatch({"w": (torch.tensor([0, 3, 7, 12]), torch.tensor([1.0, 2.0, 3.0, 4.0]))}, shape, {"base_model_hash": "h"})
    b = WeightPatch({"w": (torch.tensor([3, 8, 12]), torch.tensor([10.0, 20.0, -2.0]))}, shape, {"base_model_hash": "h"})
    result, report = compose([a, b], scales=[1.0, 2.0])
    idx, values = result.entries["w"]
    assert idx.tolist() == [0, 3, 7, 8] and values.tolist() == [1.0, 22.0, 3.0, 40.0]  # index 12: 4 − 2·2 = 0, dropped
    assert report["overlaps"] == {"w": 2} and report["total_overlaps"] == 2
    assert report["cancelled"] == {"w": 1} and report["entries"] == 4
    assert result.base_model_hash == "h" and [c["scale"] for c in result.metadata["components"]] == [1.0, 2.0]
    c = WeightPatch({"w": (torch.tensor([1]), torch.tensor([1.0]))}, shape, {"base_model_hash": "other"})
    with pytest.raises(WeightwiseError, match="different base models"):
        compose([a, c])
    assert compose([a, c], force=True)[1]["total_overlaps"] == 0
    with pytest.raises(WeightwiseError, match="2 scales for 1 patches"):
        compose([a], scales=[1.0, 2.0])


def test_compose_applied_equals_both_applied():
    _, _, p1 = make_patch(seed=1)
    _, _, p2 = make_patch(seed=2)
    both, report = compose([p1, p2])
    assert report["total_overlaps"] > 0  # 5 % masks overlap on ~0.25 % of entries
    one = tiny_model(0)
    both.apply(one)
    two = tiny_model(0)
    p1.apply(two)
    p2.apply(two, force=True)  # the model's hash changed after p1
    for name, value in one.state_dict().items():
        torch.testing.assert_close(value, two.state_dict()[name], rtol=0, atol=1e-7)


# --- folders and CLI -------------------------------------------------------------------------------


def folder_patch(tiny_dir, tmp_path, value_dtype="fp32"):
    base, _ = load_model(tiny_dir)
    tuned = perturb(load_model(tiny_dir)[0])
    patch = WeightPatch.from_models(base.state_dict(), tuned.state_dict(), {"base_model_hash": state_dict_fingerprint(base), "method": "random"})
    return base, tuned, patch.save(tmp_path / "patch.safetensors", value_dtype)


def test_merge_then_unmerge_folders(tiny_dir, tmp_path):
    base, tuned, path = folder_patch(tiny_dir, tmp_path)
    patch = WeightPatch.load(path)
    merged = patch.merge(tiny_dir, tmp_path / "merged")
    model, tokenizer = load_model(merged)
    assert tokenizer is not None
    assert state_dict_fingerprint(model) == state_dict_fingerprint(tuned)
    manifest = read_manifest(merged)
    assert manifest["kind"] == "patched-model" and manifest["scale"] == 1.0 and not manifest["forced"]
    assert manifest["source_fingerprint"] == patch.base_model_hash and manifest["fingerprint"] == state_dict_fingerprint(tuned)
    assert manifest["patch"]["sha256"] and manifest["patch"]["metadata"]["method"] == "random"
    restored = patch.unmerge(merged, tmp_path / "restored")
    assert state_dict_fingerprint(load_model(restored)[0]) == state_dict_fingerprint(base)
    # a folder edited after patching cannot be restored honestly
    model.model.norm.weight.data += 1
    model.save_pretrained(tmp_path / "edited")
    shutil.copy(merged / "manifest.json", tmp_path / "edited")
    shutil.copytree(merged / "patch_undo", tmp_path / "edited" / "patch_undo")
    with pytest.raises(WeightwiseError, match="changed after patching"):
        patch.unmerge(tmp_path / "edited", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_cli_apply_info_compose_remove(capsys, monkeypatch, tiny_dir, tmp_path):
    base, _, path = folder_patch(tiny_dir, tmp_path, "fp16")
    code, out, err = run_cli(capsys, monkeypatch, "patch", "info", path)
    assert code == 0, err
    assert "model.layers.0.mlp.down_proj.weight" in out and "fp16" in out and '"method": "random"' in out
    merged = tmp_path / "merged"
    code, _, err = run_cli(capsys, monkeypatch, "patch", "apply", tiny_dir, path, "--scale", "0.5", "-o", merged)
    assert code == 0, err
    assert read_manifest(merged)["scale"] == 0.5
    model = load_model(merged)[0]
    name = "model.layers.1.self_attn.q_proj.weight"
    idx, delta = WeightPatch.load(path).entries[name]
    change = model.state_dict()[name].view(-1)[idx] - base.state_dict()[name].view(-1)[idx]
    torch.testing.assert_close(change, 0.5 * delta, rtol=0, atol=1e-7)
    restored = tmp_path / "restored"
    code, _, err = run_cli(capsys, monkeypatch, "patch", "remove", merged, path, "-o", restored)
    assert code == 0, err
    assert state_dict_fingerprint(load_model(restored)[0]) == state_dict_fingerprint(base)
    composed = tmp_path / "both.safetensors"
    code, out, err = run_cli(capsys, monkeypatch, "patch", "compose", path, path, "--scale", "1", "--scale", "-1", "-o", composed)
    assert code == 0, err
    assert "total" in out
    assert WeightPatch.load(composed).entries == {}  # p − p cancels everywhere


def test_cli_user_errors(capsys, monkeypatch, tiny_dir, tmp_path):
    _, _, path = folder_patch(tiny_dir, tmp_path)
    other = tmp_path / "other"
    tiny_model(seed=5).save_pretrained(other)
    out = tmp_path / "out"
    assert_user_error(run_cli(capsys, monkeypatch, "patch", "apply", other, path, "-o", out), "made for base model", out)
    code, _, err = run_cli(capsys, monkeypatch, "patch", "apply", other, path, "--force", "-o", out)
    assert code == 0 and read_manifest(out)["forced"], err
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:300])
    out2 = tmp_path / "out2"
    assert_user_error(run_cli(capsys, monkeypatch, "patch", "apply", tiny_dir, cut, "-o", out2), "truncated", out2)
    assert_user_error(run_cli(capsys, monkeypatch, "patch", "remove", tiny_dir, path, "-o", out2), "not one written by", out2)
    code, _, err = run_cli(capsys, monkeypatch, "patch", "info", cut)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ")


# --- size ------------------------------------------------------------------------------------------


def random_patch(shapes, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    entries = {}
    for name, (m, n) in shapes.items():
        idx = torch.randperm(m * n, generator=g)[: round(density * m * n)].sort().values
        entries[name] = (idx, torch.randn(idx.numel(), generator=g) * 1e-3)
    return WeightPatch(entries, dict(shapes), {"base_model_hash": "h", "density": density})


SMOLLM2_LAYER = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}


def test_patch_size_at_5_percent_density(capsys):
    one = random_patch({"down": (576, 1536)}, 0.05)
    dense_fp16 = 576 * 1536 * 2
    ratios = {dtype: len(one.to_bytes(dtype)) / dense_fp16 for dtype in ("fp16", "int8")}
    # fp16 values + byte gaps = 3 bytes per entry; any lossless code of a random 5 % mask needs ≥ 5.7 bits
    # per index (binary entropy), so fp16 values alone cannot reach 1/15 on one matrix: 0.05·(16 + 5.7)/16 > 1/15
    assert ratios["fp16"] <= 0.0755 and ratios["int8"] <= 1 / 15
    # the target is the model: SmolLM2-135M, every decoder linear at 5 %, vs its fp16 size (embeddings tied)
    layer_bytes = len(random_patch({f"layers.0.{k}.weight": s for k, s in SMOLLM2_LAYER.items()}, 0.05).to_bytes("fp16"))
    params = 30 * (sum(m * n for m, n in SMOLLM2_LAYER.values()) + 2 * 576) + 49152 * 576 + 576
    model_ratio = 30 * layer_bytes / (2 * params)
    assert model_ratio <= 1 / 15
    with capsys.disabled():
        print(f"\npatch/fp16 dense at 5 %: one 576×1536 matrix fp16 {ratios['fp16']:.4f} (1/{1 / ratios['fp16']:.1f}), "
              f"int8 {ratios['int8']:.4f} (1/{1 / ratios['int8']:.1f}); SmolLM2 decoder fp16 values: 1/{1 / model_ratio:.1f}")


def test_info_reports_header_fields(tmp_path):
    _, _, patch = make_patch()
    path = patch.save(tmp_path / "p.safetensors", "int8")
    info = WeightPatch.load(path).info()
    tensor = info["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert tensor["shape"] == [64, 64] and tensor["entries"] == int(0.05 * 64 * 64)
    assert tensor["density"] == pytest.approx(0.05, abs=1 / 4096) and 0 < tensor["bytes"] < 64 * 64
    assert json.loads(json.dumps(info["metadata"])) == patch.metadata


def test_non_finite_deltas_and_out_of_range_values_are_refused():
    """A tuned tensor with NaN, or a delta fp16 cannot hold, is refused with a message naming the fix."""
    base = {"w": torch.zeros(4, 4)}
    tuned = {"w": torch.zeros(4, 4)}
    tuned["w"][1, 2] = float("nan")
    with pytest.raises(WeightwiseError, match="NaN/Inf values after tuning"):
        WeightPatch.from_models(base, tuned, {"base_model_hash": state_dict_fingerprint(base)})
    with pytest.raises(WeightwiseError, match="exceeds the fp16 range"):
        encode_values(torch.tensor([1.0, 1e6]), "fp16")
    stored, scale = encode_values(torch.tensor([1.0, 1e6]), "bf16")  # bf16 holds it
    assert scale is None and torch.equal(decode_values(stored, scale), torch.tensor([1.0, 999424.0]))
