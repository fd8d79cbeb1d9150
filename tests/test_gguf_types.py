"""GGUF export types: every mapped weightwise tensor packs into blocks that gguf-py dequantizes to exactly
weightwise's float32 weight; tensors no type stores exactly are refused with a reason."""

import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import MXFP4, dequantize as gguf_dequantize, quant_shape_to_byte_shape
from hypothesis import given, settings
from hypothesis import strategies as st

from weightwise.export.gguf_types import (
    GGUF_TYPE_RULES,
    InexactGGUFError,
    exact_gguf_type,
    pack_gguf,
    permute_qk_for_gguf,
    unpermute_qk_from_gguf,
    why_not_exact,
)
from weightwise.formats import QuantSpec, dequantize, get_format, quantize_tensor
from weightwise.formats.quantizer import unpacked_codes
from weightwise.io.gguf_families import llama_qk_row_order

SHAPES = [(8, 64), (6, 192), (24, 128)]  # cols multiples of 64, so 32- and 64-groups both fit
GRANULARITIES = {"g32": {"group_size": 32}, "g64": {"group_size": 64}, "channel": {"granularity": "channel"}}


def _weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Gaussian rows of uneven magnitude, so scales differ from group to group."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen).add(0.1)


def _specs(rule) -> list[QuantSpec]:
    """The specs a rule covers: MX formats have fixed 32-blocks; others at group 32, 64 and per channel."""
    dtype = {"scale_dtype": rule.scale_dtypes[0]} if rule.scale_dtypes else {}
    if get_format(rule.format).block_size is not None:
        return [QuantSpec(format=rule.format)]
    return [QuantSpec(format=rule.format, **layout, **dtype) for layout in GRANULARITIES.values()]


CASES = [(rule, spec) for rule in GGUF_TYPE_RULES for spec in _specs(rule)]


def _assert_exact(qt) -> GGMLQuantizationType:
    gguf_type, blocks = pack_gguf(qt)
    assert blocks.dtype == np.uint8 and blocks.shape == quant_shape_to_byte_shape(qt.shape, gguf_type)
    ours = dequantize(qt).numpy()
    theirs = gguf_dequantize(blocks, gguf_type)
    assert theirs.dtype == np.float32 and np.array_equal(theirs, ours)
    return gguf_type


@pytest.mark.parametrize(("rule", "spec"), CASES, ids=[f"{r.format}-{r.gguf_type.name}-{i}" for i, (r, _) in enumerate(CASES)])
def test_every_rule_dequantizes_in_gguf_exactly_as_in_weightwise(rule, spec):
    for seed, shape in enumerate(SHAPES):
        qt = quantize_tensor(_weight(shape, seed), spec)
        assert exact_gguf_type(spec, shape) == rule and why_not_exact(spec, shape) is None
        assert _assert_exact(qt) == rule.gguf_type


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(format="int4", granularity="tensor"),
        QuantSpec(format="int4_asym", group_size=128, scale_dtype="bf16"),  # bf16 in fp16's normal range is fp16-exact
        QuantSpec(format="int3", group_size=32, scale_dtype="e8m0"),
        QuantSpec(format="int4", group_size=32, pow2_scales="all"),
        QuantSpec(format="int4", group_size=32, pow2_scales="ratio"),
        QuantSpec(format="int5_asym", group_size=64, pow2_scales="ratio"),
        QuantSpec(format="fp4_e2m1", group_size=32, scale_dtype="e8m0", pow2_scales="ratio"),
    ],
    ids=lambda spec: f"{spec.format}-{spec.granularity}-{spec.scale_dtype}-{spec.pow2_scales}",
)
def test_other_scale_storage_that_fits_fp16_is_exact(spec):
    _assert_exact(quantize_tensor(_weight((16, 256), 3), spec))


def test_mxfp4_codes_and_e8m0_bytes_carry_over_unchanged():
    # gguf-py's MXFP4 levels are the E2M1 values doubled and its scale 2^(e-128) is halved, so both cancel
    e2m1 = get_format("fp4_e2m1").value_table.numpy()
    assert np.array_equal(np.array(MXFP4.kvalues, dtype=np.float32), 2 * e2m1)
    exponents = np.arange(255, dtype=np.uint8)
    one = np.float32(1)  # ldexp, not exp2: numpy's vectorised float32 exp2 overflows at 2^127
    assert np.array_equal(2 * MXFP4.e8m0_to_fp32_half(exponents), np.ldexp(one, exponents.astype(np.int32) - 127))
    qt = quantize_tensor(_weight((4, 96), 0), QuantSpec(format="mxfp4"))
    _, blocks = pack_gguf(qt)
    blocks = blocks.reshape(4, 3, 17)
    assert np.array_equal(blocks[..., 0], qt.scales.numpy())
    nibbles = np.concatenate([blocks[..., 1:] & 0x0F, blocks[..., 1:] >> 4], axis=-1).reshape(4, 96)
    assert np.array_equal(nibbles, unpacked_codes(qt).numpy())


@pytest.mark.parametrize(
    ("spec", "shape", "reason"),
    [
        (QuantSpec(format="nf4", group_size=32), (4, 64), "nf4"),
        (QuantSpec(format="int8_asym", group_size=32), (4, 64), "int8_asym"),
        (QuantSpec(format="fp8_e4m3", group_size=32), (4, 64), "fp8_e4m3"),
        (QuantSpec(format="int4", group_size=48), (4, 96), "not a multiple"),
        (QuantSpec(format="int4", group_size=32, pad=True), (4, 80), "80 entries"),
        (QuantSpec(format="int4", group_size=64, pad=True), (4, 96), "padded"),
        (QuantSpec(format="int4", granularity="channel"), (4, 48), "48 entries"),
    ],
)
def test_specs_without_an_exact_type_say_why(spec, shape, reason):
    assert exact_gguf_type(spec, shape) is None
    assert reason in why_not_exact(spec, shape)
    with pytest.raises(InexactGGUFError, match=reason):
        pack_gguf(quantize_tensor(_weight(shape, 0), spec))


def test_scales_outside_fp16_are_refused():
    tiny = _weight((4, 64), 0) * 1e-9  # bf16 keeps scales near 1e-10; fp16 flushes them
    with pytest.raises(InexactGGUFError, match="fp16"):
        pack_gguf(quantize_tensor(tiny, QuantSpec(format="int4", group_size=32, scale_dtype="bf16")))
    with pytest.raises(InexactGGUFError, match="fp16"):  # fp32 scales carry more mantissa than fp16
        pack_gguf(quantize_tensor(_weight((4, 64), 0), QuantSpec(format="int4_asym", group_size=32, scale_dtype="fp32")))


def test_fp4_scale_halving_that_loses_an_fp16_subnormal_bit_is_refused():
    w = torch.zeros(2, 32)
    w[:, 0] = 6 * 3 * 2.0**-24  # absmax / 6 = 3·2^-24: an fp16 subnormal whose half is not one
    with pytest.raises(InexactGGUFError, match="fp16"):
        pack_gguf(quantize_tensor(w, QuantSpec(format="fp4_e2m1", group_size=32)))
    _assert_exact(quantize_tensor(2 * w, QuantSpec(format="fp4_e2m1", group_size=32)))  # 6·2^-24 halves exactly


def test_ratio_scales_whose_shifted_products_leave_fp16_are_refused():
    w = _weight((2, 64), 1)
    w[:, 32:] *= 2.0**-14  # second group shifted 14 binades down: row scale · 2^-14 drops into fp16 subnormals
    qt = quantize_tensor(w, QuantSpec(format="int4", group_size=32, pow2_scales="ratio"))
    with pytest.raises(InexactGGUFError, match="fp16"):
        pack_gguf(qt)


@settings(max_examples=25, deadline=None)
@given(
    fmt=st.sampled_from(["int4", "int4_asym"]),
    rows=st.integers(1, 12),
    blocks=st.integers(1, 8),
    layout=st.sampled_from(["g32", "channel", "tensor"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_q4_packing_is_exact_for_any_shape(fmt, rows, blocks, layout, seed):
    options = {"granularity": "tensor"} if layout == "tensor" else GRANULARITIES[layout]
    gguf_type = _assert_exact(quantize_tensor(_weight((rows, 32 * blocks), seed), QuantSpec(format=fmt, **options)))
    assert gguf_type == (GGMLQuantizationType.Q4_1 if fmt == "int4_asym" else GGMLQuantizationType.Q4_0)


def test_written_gguf_reads_back_with_the_same_type_and_weight(tmp_path):
    qt = quantize_tensor(_weight((8, 128), 2), QuantSpec(format="iq4_nl", group_size=64))
    gguf_type, blocks = pack_gguf(qt)
    path = tmp_path / "one.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_down.weight", blocks, raw_dtype=gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = GGUFReader(path).tensors
    assert tensor.tensor_type == GGMLQuantizationType.IQ4_NL and list(tensor.shape) == [128, 8]  # ggml: fastest dim first
    assert np.array_equal(gguf_dequantize(np.asarray(tensor.data), gguf_type), dequantize(qt).numpy())


def test_a_576_by_1536_matrix_packs_in_well_under_a_second():
    qt = quantize_tensor(_weight((576, 1536), 0), QuantSpec(format="int5", group_size=32))
    start = time.perf_counter()
    pack_gguf(qt)
    assert time.perf_counter() - start < 0.5


def _hf_to_gguf_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute, as written there."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(format="int4", group_size=32),
        QuantSpec(format="int3_asym", granularity="channel"),
        QuantSpec(format="int4", granularity="tensor"),
        QuantSpec(format="int4", group_size=32, pow2_scales="ratio"),
        QuantSpec(format="mxfp4"),
    ],
    ids=lambda spec: f"{spec.format}-{spec.granularity}-{spec.pow2_scales}",
)
def test_qk_permutation_moves_rows_with_their_scales_and_round_trips(spec):
    n_head = 4
    w = _weight((n_head * 16, 64), 5)
    qt = quantize_tensor(w, spec)
    permuted = permute_qk_for_gguf(qt, n_head)
    assert torch.equal(dequantize(permuted), _hf_to_gguf_permute(dequantize(qt), n_head))
    assert torch.equal(llama_qk_row_order(w.shape[0], n_head), _hf_to_gguf_permute(torch.arange(w.shape[0]), n_head))
    back = unpermute_qk_from_gguf(permuted, n_head)
    assert torch.equal(back.packed_codes, qt.packed_codes) and torch.equal(back.scales, qt.scales)
    assert torch.equal(dequantize(back), dequantize(qt))
    _assert_exact(permuted)
