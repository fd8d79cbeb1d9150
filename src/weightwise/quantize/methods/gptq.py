"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) as pure tensor math, for any registered format.

Columns of a weight are quantized one at a time; each column's rounding error is spread onto the
columns not yet quantized through the inverse Hessian of the layer's inputs (H = XᵀX / n), so that
the layer's *outputs* stay close rather than its weights. Every column is rounded with the same
scale/offset/code helpers as round-to-nearest, so any number format and granularity works.
"""

from __future__ import annotations

import torch

from weightwise.errors import WeightwiseError
from weightwise.formats.base import SHIFT_BITS, QuantizedTensor, QuantSpec
from weightwise.formats.packing import pack_codes
from weightwise.formats.quantizer import (
    STRIP_ROWS,
    all_finite,
    check_finite,
    compute_ratio_scales,
    compute_scales,
    decode_scale,
    dequantize,
    encode_scale,
    from_codes,
    group_layout,
    ratio_group_scales,
    to_codes,
    to_groups,
)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor,
                 row_weights: torch.Tensor | None = None) -> float:
    """trace((W − Ŵ) H (W − Ŵ)ᵀ): the layer-output error GPTQ minimises.

    With H = XᵀX / n this is the summed squared error of ``X @ Wᵀ`` per calibration input.
    ``row_weights`` (one per output channel) weight each channel's error, e.g. by how much the loss
    cares about it (see ``quantize.sensitivity``).
    """
    e = (weight - approx).to(torch.float64)
    per_row = ((e @ hessian.to(torch.float64)) * e).sum(dim=1)
    if row_weights is not None:
        per_row = per_row * row_weights.to(torch.float64)
    return float(per_row.sum())


def refit_scales(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                 spec: QuantSpec, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Least-squares scales (and offsets) for fixed codes under the output error tr((W − Ŵ) H (W − Ŵ)ᵀ).

    Each dequantized entry is ``v(code)·s + o``, linear in its group's (s, o), so per output row the best
    scales solve a small (G or 2G)² system: θ = (Aᵀ H A)⁻¹ Aᵀ H w, A holding each group's code values
    (and ones). GPTQ chooses the codes with error feedback, so the max-based scales they were rounded
    with are not the best ones for them. Scales are stored in the recipe's dtype; a row keeps its old
    scales when the new ones are not finite or change sign, or (after storage rounding) not better.
    Returns (scale, offset, rows changed). Needs whole groups (no padding) and free scales (no MX or
    power-of-two constraints).
    """
    rows, cols = weight.shape
    _, n_groups, g = group_layout((rows, cols), spec)
    fmt, dtype = spec.number_format, spec.resolved_scale_dtype
    h = hessian.to(torch.float64)
    values = fmt.code_values(codes).to(torch.float64).reshape(rows, n_groups, g)
    basis = values.unsqueeze(1) if offset is None else torch.stack([values, torch.ones_like(values)], dim=1)  # (r, k, G, g)
    n_params = basis.shape[1] * n_groups
    h4 = h.reshape(n_groups, g, n_groups, g)
    gram = torch.einsum("rkai,aibj,rlbj->rkalb", basis, h4, basis).reshape(rows, n_params, n_params)
    rhs = torch.einsum("rkai,rai->rka", basis, (weight.to(torch.float64) @ h).reshape(rows, n_groups, g)).reshape(rows, n_params)
    ridge = 1e-9 * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
    theta = torch.linalg.solve(gram + ridge[:, None, None] * torch.eye(n_params, dtype=gram.dtype, device=gram.device), rhs.unsqueeze(-1))[..., 0]
    theta = theta.reshape(rows, -1, n_groups)
    new_scale = encode_scale(theta[:, 0].to(torch.float32), dtype)
    new_offset = None if offset is None else encode_scale(theta[:, 1].to(torch.float32), dtype)

    def row_errors(s_stored, o_stored):
        approx = from_codes(codes.reshape(rows, n_groups, g), decode_scale(s_stored, dtype),
                            None if o_stored is None else decode_scale(o_stored, dtype), fmt).reshape(rows, cols)
        e = (weight - approx).to(torch.float64)
        return ((e @ h) * e).sum(dim=1)

    new_s = decode_scale(new_scale, dtype)
    # a scale keeps its sign: signed-absmax formats store negative scales (largest entry on the negative end)
    ok = torch.isfinite(new_s).all(dim=1) & (new_s * decode_scale(scale, dtype) > 0).all(dim=1)
    if new_offset is not None:
        ok &= torch.isfinite(decode_scale(new_offset, dtype)).all(dim=1)
    ok &= row_errors(new_scale, new_offset) < row_errors(scale, offset)
    keep = ~ok[:, None]
    scale = torch.where(keep, scale, new_scale)
    offset = None if offset is None else torch.where(keep, offset, new_offset)
    return scale, offset, int(ok.sum())


def _reversed_hessian(hessian: torch.Tensor, backwards: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
    """J P H P J in float64 (rows and columns in ``backwards`` order, the diagonal replaced by ``diagonal``), built a
    strip of rows at a time: no float32 copy of the whole matrix beside it (11008 inputs: 0.5 GB each)."""
    n = len(backwards)
    out = torch.empty(n, n, dtype=torch.float64, device=hessian.device)
    for start in range(0, n, STRIP_ROWS):
        out[start : start + STRIP_ROWS] = hessian.index_select(0, backwards[start : start + STRIP_ROWS]).index_select(1, backwards)
    out.diagonal().copy_(diagonal[backwards])
    return out


def _inverse_cholesky(reversed_h: torch.Tensor, damp: float, max_retries: int) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor (float32) of (H + damp·mean(diag H)·I)⁻¹, damp growing 10× per failed attempt, from
    ``reversed_h`` = J H J (H with its rows and columns in reverse order), which it overwrites.

    One Cholesky and one triangular inverse, no explicit H⁻¹: with J the order-reversing permutation,
    J H J = M Mᵀ (M lower) gives H⁻¹ = (J M⁻¹ J)ᵀ (J M⁻¹ J), and J M⁻¹ J is upper triangular with a
    positive diagonal, so it is the upper Cholesky factor of H⁻¹ (about half the flops of inverting H and
    factorising the inverse; 1.9× faster measured at 1536 columns). Memory: two float64 matrices at most (the
    input, dampened in place and then reused for M⁻¹, and M) and then the float32 result beside the input, which
    matters for wide layers (11008 inputs: 0.97 GB each): the identity is laid out column-major (the input's
    transpose), as the triangular solver works, so that it solves in place instead of on a copy, and the result is
    converted a strip at a time. Returns (factor, damp used, retries). A factor is refused when the Cholesky reports
    a non-positive pivot or anything is non-finite.
    """
    h, diagonal = reversed_h, reversed_h.diagonal().clone()
    mean = diagonal.mean()
    n = h.shape[0]
    for retry in range(max_retries + 1):
        d = damp * 10**retry
        h.diagonal().copy_(diagonal + d * mean)
        lower, info = torch.linalg.cholesky_ex(h)
        if info == 0 and all_finite(lower):
            h.zero_()
            h.diagonal().fill_(1)
            torch.linalg.solve_triangular(lower, h.mT, upper=False, out=h.mT)  # h now holds (M⁻¹)ᵀ
            del lower
            if not all_finite(h):
                raise WeightwiseError(f"GPTQ: the inverse Hessian factor is not finite (dampening {d:g}·mean(diag)); "
                                      "check the calibration statistics (enough tokens, no NaN) or raise damp")
            factor = torch.empty(n, n, dtype=torch.float32, device=h.device)
            for start in range(0, n, STRIP_ROWS):  # factor[i, j] = M⁻¹[n-1-i, n-1-j] = h[n-1-j, n-1-i]
                stop = min(start + STRIP_ROWS, n)
                factor[start:stop] = h[:, n - stop : n - start].T.flip(0, 1)
            return factor, d, retry
    raise WeightwiseError(
        f"GPTQ: the Hessian is not positive definite even with dampening {damp * 10**max_retries:g}·mean(diag) "
        f"after {max_retries} retries; check the calibration statistics (enough tokens, no NaN) or raise damp"
    )


def gptq(
    weight: torch.Tensor,
    spec: QuantSpec,
    hessian: torch.Tensor,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = True,
    max_damp_retries: int = 6,
    least_squares_scales: bool = False,
    initial_scales: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[QuantizedTensor, dict]:
    """Quantize ``weight`` (out, in) to ``spec`` with GPTQ under ``hessian`` (in, in) = XᵀX / n.

    - Dead inputs (diag(H) == 0) get diag 1 and a zeroed weight column; ``damp``·mean(diag H) is
      added to the diagonal and multiplied by 10 (at most ``max_damp_retries`` times) while the
      Cholesky factor of H⁻¹ fails; then a :class:`WeightwiseError` is raised.
    - Scales: ``static_groups`` computes every group's scale/offset from the weight up front,
      exactly as RTN does; otherwise each group's are refitted from the error-updated columns when
      the loop reaches the group's first column. Per-tensor and per-channel scales are always
      computed up front. Columns are rounded with the *stored* scales, so ``dequantize`` of the
      result is the GPTQ reconstruction.
    - ``act_order`` processes columns by decreasing diag(H) (most-informed inputs first); with
      group granularity it always uses static group scales, so each scale still belongs to its
      contiguous group of original columns. Codes and scales are returned in the original order.
    - Error updates are applied lazily, ``block_size`` columns at a time.

    - ``initial_scales``: stored (scales, offsets) to round with instead of the weights' own, as static
      group or channel scales (e.g. from a clip search or an earlier pass; ignored under
      ``pow2_scales="ratio"``).
    - ``least_squares_scales``: afterwards, each row's scales (and offsets) are refitted to the chosen codes by least
      squares under H (:func:`refit_scales`), where the format allows free scales.

    Returns the quantized tensor and diagnostics ``{"damp", "retries", "proxy_loss"}`` (+ ``"refit_rows"``);
    ``proxy_loss`` is the sum of GPTQ's per-column losses (w − q)² / [H_F⁻¹]_qq, which equals
    ``output_error`` under the dampened Hessian (with dead columns zeroed).
    """
    if weight.ndim != 2:
        raise WeightwiseError(f"GPTQ: only 2-D weights can be quantized, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if block_size < 1:
        raise WeightwiseError(f"GPTQ: block_size must be a positive integer, got {block_size}")
    if hessian.shape != (cols, cols):
        raise WeightwiseError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match {cols} input features")
    check_finite(weight)
    check_finite(hessian, "hessian")
    fmt, dtype = spec.number_format, spec.resolved_scale_dtype
    w = weight.detach().to(torch.float32).clone()
    shifts = None
    if spec.pow2_scales == "ratio":  # the row scale depends on every group: static scales only
        scale, shift_codes, offset = compute_ratio_scales(to_groups(w, spec), fmt, dtype)
        scale_f, shifts = ratio_group_scales(scale, shift_codes, dtype), pack_codes(shift_codes, SHIFT_BITS)
    elif initial_scales is not None:
        scale, offset = (None if t is None else t.clone() for t in initial_scales)
        expected = group_layout((rows, cols), spec)[:2]
        if tuple(scale.shape) != expected or (offset is None) != (not fmt.asymmetric):
            raise WeightwiseError(f"GPTQ: initial scales of shape {tuple(scale.shape)} (offsets: {offset is not None}) "
                                  f"do not fit {spec.format} groups {expected}")
        scale_f = decode_scale(scale, dtype)
    else:
        scale, offset = compute_scales(to_groups(w, spec), fmt, dtype, spec.pow2_scales)
        scale_f = decode_scale(scale, dtype)
    _, _, g = group_layout((rows, cols), spec)
    grouped = spec.granularity == "group"
    group_of = torch.arange(cols, device=w.device) // (g if grouped else cols)  # column → its scale's column
    refit = grouped and not static_groups and not act_order and shifts is None and initial_scales is None

    diagonal = hessian.detach().diagonal().to(torch.float64, copy=True)
    dead = diagonal == 0
    diagonal[dead] = 1
    w[:, dead] = 0
    perm = torch.arange(cols, device=w.device)
    if act_order:
        perm = torch.argsort(diagonal, descending=True, stable=True)
    reversed_h = _reversed_hessian(hessian.detach(), perm.flip(0), diagonal)  # the processing order, reversed
    u, damp, retries = _inverse_cholesky(reversed_h, damp, max_damp_retries)
    del reversed_h

    # Transposed layout: row j of wt is the j-th column processed, so each column read is contiguous.
    wt = w[:, perm].T.contiguous()
    group_of = group_of[perm]
    scale_t = scale_f[:, group_of].T.contiguous()  # (cols, R), R = 1 for per-tensor
    offset_t = None if offset is None else decode_scale(offset, dtype)[:, group_of].T.contiguous()
    codes_t = torch.empty(cols, rows, dtype=torch.uint8, device=w.device)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    # When refitting, every group starts a block, so its columns have received all earlier updates.
    starts = sorted(set(range(0, cols, block_size)) | (set(range(0, cols, g)) if refit else set()))
    for b0, b1 in zip(starts, starts[1:] + [cols]):
        if refit and b0 % g == 0:
            gs, go = compute_scales(wt[b0 : b0 + g].T.unsqueeze(1), fmt, dtype, spec.pow2_scales)
            scale[:, b0 // g] = gs[:, 0]
            scale_t[b0 : b0 + g] = decode_scale(gs[:, 0], dtype)
            if go is not None:
                offset[:, b0 // g] = go[:, 0]
                offset_t[b0 : b0 + g] = decode_scale(go[:, 0], dtype)
        block, ub = wt[b0:b1], u[b0:b1, b0:b1]
        err = torch.empty_like(block)
        for k in range(b1 - b0):
            j = b0 + k
            # Left-looking: apply this block's earlier errors to column k only when it is reached
            # (one matrix-vector product instead of a rank-1 update of the whole rest of the block).
            col = (block[k] - err[:k].T @ ub[:k, k]).unsqueeze(1)
            s, o = scale_t[j], None if offset_t is None else offset_t[j]
            c = to_codes(col, s, o, fmt)
            codes_t[j] = c[:, 0]
            err[k] = (col - from_codes(c, s, o, fmt))[:, 0] / ub[k, k]
        wt[b1:].addmm_(u[b0:b1, b1:].T, err, alpha=-1)
        loss += err.square().sum()

    codes = codes_t.T[:, torch.argsort(perm)]
    diagnostics = {"damp": damp, "retries": retries, "proxy_loss": float(loss)}
    if least_squares_scales and can_refit(spec, (rows, cols)):
        dampened = hessian.detach().to(torch.float64, copy=True)  # H + damp·mean(diag H)·I, dead inputs' diagonal 1
        dampened.diagonal().copy_(diagonal + damp * diagonal.mean())
        scale, offset, diagnostics["refit_rows"] = refit_scales(w, codes, scale, offset, spec, dampened)
    qt = QuantizedTensor(pack_codes(codes, fmt.bits), scale, offset, (rows, cols), spec, shifts)
    return qt, diagnostics


def gptq_rounds(weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor, rounds: int,
                initial_scales: tuple[torch.Tensor, torch.Tensor | None] | None = None, **options) -> tuple[QuantizedTensor, dict]:
    """GPTQ with least-squares scales, then ``rounds`` more GPTQ passes, each rounding with the previous
    pass's refitted scales as its static scales; the pass with the least output error tr(ΔW H ΔWᵀ) is kept.

    Alternates the two halves of the problem: codes for fixed scales (GPTQ) and scales for fixed codes
    (least squares), starting from ``initial_scales`` (default: the weights' own). Diagnostics: the first
    pass's, plus ``"round_errors"`` (each pass's output error) and ``"best_round"``.
    """
    if rounds < 0:
        raise WeightwiseError(f"GPTQ: refit rounds must be ≥ 0, got {rounds}")
    best, diagnostics = gptq(weight, spec, hessian, least_squares_scales=True, initial_scales=initial_scales, **options)
    if rounds == 0 or not can_refit(spec, tuple(weight.shape)):
        return best, diagnostics
    errors = [output_error(weight, dequantize(best), hessian)]
    current = best
    for _ in range(rounds):
        current, _ = gptq(weight, spec, hessian, least_squares_scales=True,
                          initial_scales=(current.scales, current.offsets), **options)
        errors.append(output_error(weight, dequantize(current), hessian))
        if errors[-1] < min(errors[:-1]):
            best = current
    return best, {**diagnostics, "round_errors": errors, "best_round": errors.index(min(errors))}


def can_refit(spec: QuantSpec, shape: tuple[int, int]) -> bool:
    """Whether :func:`refit_scales` applies: free (not MX / power-of-two) scales over whole groups."""
    _, n_groups, g = group_layout(shape, spec)
    return (spec.number_format.scaling != "mx" and spec.pow2_scales == "none" and spec.resolved_scale_dtype != "e8m0"
            and spec.granularity != "tensor" and n_groups * g == shape[1])
