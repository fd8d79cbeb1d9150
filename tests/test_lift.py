"""LIFT principal-weight masks (tune/lift.py) and the sparse-state Adam (tune/optim.py)."""

import pytest
import torch
from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.tune.lift import (
    budget_k,
    magnitude_mask,
    principal_mask,
    random_mask,
)
from weightwise.tune.optim import SparseAdam


def _planted(seed: int = 0) -> torch.Tensor:
    """8×6 matrix = rank-2 structure (zero in row 7 and column 5) + small noise + one outlier at (7, 5).

    The outlier is among the 5 largest |W| but orthogonal to the planted structure and smaller than
    its second singular value, so the rank-2 approximation drops it.
    """
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(8, 2, generator=g), torch.randn(6, 2, generator=g)
    u[7], v[5] = 0, 0
    w = 2 * u @ v.T + 0.05 * torch.randn(8, 6, generator=g)
    w[7, 5] = 1.05 * w.abs().flatten().sort(descending=True).values[4]
    return w


OUTLIER = 7 * 6 + 5


def _brute_force_top_k(w: torch.Tensor, rank: int, k: int, largest: bool = True) -> set[int]:
    """Best rank-r approximation in fp64 from scratch, then sort all |W′| with Python."""
    u, s, vh = torch.linalg.svd(w.double())
    approx = (u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]).abs().flatten().tolist()
    order = sorted(range(len(approx)), key=lambda i: approx[i], reverse=largest)
    return set(order[:k])


# -- masks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank,k", [(1, 5), (2, 12), (3, 20)])
def test_principal_mask_holds_the_k_largest_low_rank_entries(rank, k):
    w = _planted()
    mask = principal_mask(w, k, filter_rank=rank)
    assert mask.dtype == torch.long and mask.shape == (k,) and bool((mask[1:] > mask[:-1]).all())
    assert set(mask.tolist()) == _brute_force_top_k(w, rank, k)
    assert set(mask.tolist()) != _brute_force_top_k(w, rank, k, largest=False)  # not the reference code's slip


def test_low_rank_filter_changes_the_choice():
    w = _planted()
    assert w[7, 5] < torch.linalg.svdvals(w)[1] / 1.5  # the premise of the planted matrix
    lift, mag = set(principal_mask(w, 5, filter_rank=2).tolist()), set(magnitude_mask(w, 5).tolist())
    assert OUTLIER in mag and OUTLIER not in lift


def test_full_filter_rank_equals_magnitude():
    w = _planted()
    for k in (1, 10, 48):
        assert torch.equal(principal_mask(w, k, filter_rank=6), magnitude_mask(w, k))
        assert torch.equal(principal_mask(w, k, filter_rank=128), magnitude_mask(w, k))


def test_ties_are_broken_towards_lower_indices():
    w = torch.tensor([[1.0, 3.0, 2.0], [3.0, 2.0, 3.0]])
    assert magnitude_mask(w, 2).tolist() == [1, 3]
    assert magnitude_mask(w, 4).tolist() == [1, 2, 3, 5]


def test_randomized_svd_is_close_to_exact_and_leaves_global_rng_alone():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 8, generator=g) @ torch.randn(8, 160, generator=g) + 1e-4 * torch.randn(96, 160, generator=g)
    k = budget_k(w.shape, density=0.05)
    state = torch.random.get_rng_state()
    exact = set(principal_mask(w, k, filter_rank=8).tolist())
    fast = principal_mask(w, k, filter_rank=8, randomized=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(exact & set(fast.tolist())) >= 0.97 * k
    again = principal_mask(w, k, filter_rank=8, randomized=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast, again)


def test_random_mask_is_seeded_sorted_and_unique():
    w = torch.zeros(30, 40)
    a = random_mask(w, 100, generator=torch.Generator().manual_seed(3))
    b = random_mask(w, 100, generator=torch.Generator().manual_seed(3))
    c = random_mask(w, 100, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().numel() == 100 and bool((a[1:] > a[:-1]).all()) and int(a.max()) < 1200


def test_budget_k():
    assert budget_k((576, 1536), density=0.05) == round(0.05 * 576 * 1536)
    assert budget_k((576, 1536), rank_budget=16) == 16 * (576 + 1536)
    assert budget_k((8, 6), rank_budget=100) == 48  # clipped to the matrix
    assert budget_k((8, 6), density=1e-6) == 1
    assert budget_k((8, 6), density=1.0) == 48


@pytest.mark.parametrize("kwargs", [{}, {"density": 0.1, "rank_budget": 2}, {"density": 0.0}, {"density": 1.5},
                                    {"rank_budget": 0}, {"rank_budget": 1.5}])
def test_budget_k_rejects_bad_budgets(kwargs):
    with pytest.raises(WeightwiseError):
        budget_k((8, 6), **kwargs)


def test_mask_rejects_bad_input():
    with pytest.raises(WeightwiseError):
        principal_mask(_planted(), 49)
    with pytest.raises(WeightwiseError):
        magnitude_mask(torch.tensor([[1.0, float("nan")]]), 1)
    with pytest.raises(WeightwiseError):
        principal_mask(_planted(), 3, filter_rank=0)


# -- SparseAdam -------------------------------------------------------------------------------------


def _layer(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(6, 8, bias=False)


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 8, generator=g)) for _ in range(n)]


def _loss(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((layer(x) - y) ** 2).mean()


def _sparse(layer: nn.Linear, mask: torch.Tensor, **kw) -> SparseAdam:
    opt = SparseAdam({"w": layer.weight}, {"w": mask}, lr=kw.pop("lr", 0.05), **kw)
    opt.attach_hooks()
    return opt


MASK = torch.tensor([0, 3, 7, 8, 15, 22, 23, 30, 41, 47])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sparse_adam_equals_dense_adamw_restricted_to_the_mask(weight_decay):
    sparse_layer, dense_layer = _layer(), _layer()
    before = sparse_layer.weight.detach().clone()
    opt = _sparse(sparse_layer, MASK, weight_decay=weight_decay)
    ref = torch.optim.AdamW([dense_layer.weight], lr=0.05, weight_decay=weight_decay, foreach=False)
    keep = torch.zeros(48, dtype=torch.bool)
    keep[MASK] = True
    for x, y in _batches(6):
        _loss(sparse_layer, x, y).backward()
        assert sparse_layer.weight.grad is None  # the dense grad was reduced and freed in the hook
        opt.step()
        ref.zero_grad()
        _loss(dense_layer, x, y).backward()
        dense_layer.weight.grad.view(-1)[~keep] = 0
        ref.step()
        with torch.no_grad():  # AdamW decays every entry; undo it outside the mask so both models see the same weights
            dense_layer.weight.view(-1)[~keep] = before.view(-1)[~keep]
    got, want = sparse_layer.weight.detach().view(-1), dense_layer.weight.detach().view(-1)
    torch.testing.assert_close(got[MASK], want[MASK], rtol=1e-6, atol=1e-7)  # bitwise equal with torch 2.13
    assert torch.equal(got[~keep], before.view(-1)[~keep])  # outside the mask: untouched (no decay either)
    assert not torch.equal(got[MASK], before.view(-1)[MASK])


def test_accumulating_two_micro_batches_equals_their_sum():
    (x1, y1), (x2, y2) = _batches(2)
    a, b = _layer(), _layer()
    opt_a, opt_b = _sparse(a, MASK), _sparse(b, MASK)
    _loss(a, x1, y1).backward()
    _loss(a, x2, y2).backward()
    (_loss(b, x1, y1) + _loss(b, x2, y2)).backward()
    torch.testing.assert_close(opt_a.grad_buffers()["w"], opt_b.grad_buffers()["w"], rtol=1e-6, atol=1e-8)
    opt_a.step()
    opt_b.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
    assert not opt_a.grad_buffers()["w"].any()  # step cleared the buffer


def test_remask_keeps_surviving_moments_and_starts_new_ones_at_zero():
    layer = _layer()
    opt = _sparse(layer, MASK)
    for x, y in _batches(3):
        _loss(layer, x, y).backward()
        opt.step()
    old = opt.state_dict()
    new_mask = torch.tensor([0, 1, 7, 15, 16, 30, 40, 47])  # keeps 0, 7, 15, 30, 47
    assert opt.remask("w", new_mask) == {"kept": 5, "new": 3, "dropped": 5}
    st = opt.state_dict()
    assert torch.equal(st["w.indices"], new_mask)
    was_at = {j: i for i, j in enumerate(MASK.tolist())}
    for field in ("exp_avg", "exp_avg_sq"):
        for i, j in enumerate(new_mask.tolist()):
            if j in was_at:
                assert st[f"w.{field}"][i] == old[f"w.{field}"][was_at[j]] != 0
            else:
                assert st[f"w.{field}"][i] == 0
    assert st["w.born"].tolist() == [0, 3, 0, 0, 3, 0, 3, 0]
    # a newcomer's first update is a fresh Adam step: lr·sign(g) (up to eps), not a bias-skewed one
    before = layer.weight.detach().clone().view(-1)
    x, y = _batches(1, seed=9)[0]
    _loss(layer, x, y).backward()
    g = opt.grad_buffers()["w"].clone()
    opt.step()
    moved = layer.weight.detach().view(-1)[new_mask] - before[new_mask]
    fresh = torch.tensor([j not in MASK.tolist() for j in new_mask.tolist()])
    torch.testing.assert_close(moved[fresh], -0.05 * g[fresh].sign(), rtol=1e-4, atol=1e-6)


def test_state_dict_round_trip_continues_identically(tmp_path):
    from safetensors.torch import load_file, save_file

    a = _layer()
    opt_a = _sparse(a, MASK, weight_decay=0.01)
    batches = _batches(6)
    for x, y in batches[:3]:
        _loss(a, x, y).backward()
        opt_a.step()
    opt_a.remask("w", torch.tensor([0, 1, 7, 15, 16, 30, 40, 47]))
    state = opt_a.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    save_file(tensors, tmp_path / "optim.safetensors")

    b = _layer()
    b.weight.data.copy_(a.weight.data)
    opt_b = _sparse(b, MASK, lr=1.0)  # wrong settings on purpose: loading must restore them
    opt_b.load_state_dict({**load_file(tmp_path / "optim.safetensors"), **scalars})
    for x, y in batches[3:]:
        for layer, opt in ((a, opt_a), (b, opt_b)):
            _loss(layer, x, y).backward()
            opt.step()
    assert torch.equal(a.weight, b.weight)
    assert all(torch.equal(v, opt_b.state_dict()[k]) if isinstance(v, torch.Tensor) else v == opt_b.state_dict()[k]
               for k, v in opt_a.state_dict().items())


def test_load_state_dict_refuses_another_model():
    opt = _sparse(_layer(), MASK)
    state = {k.replace("w.", "v."): v for k, v in opt.state_dict().items()}
    with pytest.raises(WeightwiseError):
        opt.load_state_dict(state)


def test_state_bytes_counts_moments_and_a_one_byte_per_entry_mask():
    torch.manual_seed(0)
    layer = nn.Linear(576, 192, bias=False)
    with torch.no_grad():
        layer.weight[10:12] = 0  # two empty rows: gaps over 1,000 that need an escape
        layer.weight[100] = 0
    k = budget_k(layer.weight.shape, density=0.05)
    mask = magnitude_mask(layer.weight, k)
    opt = _sparse(layer, mask)
    gaps = torch.diff(mask, prepend=mask.new_tensor([-1])) - 1
    long_gaps = int((gaps >= 255).sum())
    assert long_gaps == 2 and int(gaps.max()) - 255 > 255
    assert opt.state_bytes() == 2 * k * 4 + k + 2 * long_gaps  # uint8 gaps, a uint16 escape per long gap
    assert opt.state_bytes() < 2 * k * 4 * 1.15  # within 15 % of the moments alone
    assert torch.equal(opt.masks["w"], mask)  # the encoded mask decodes to the same indices


def test_detached_hooks_leave_dense_grads_and_step_refuses():
    layer = _layer()
    opt = _sparse(layer, MASK)
    opt.detach_hooks()
    x, y = _batches(1)[0]
    _loss(layer, x, y).backward()
    assert layer.weight.grad is not None
    with pytest.raises(RuntimeError):
        opt.step()


@pytest.mark.parametrize("mask", [torch.tensor([3, 1]), torch.tensor([1, 1]), torch.tensor([48]), torch.tensor([0.0])])
def test_invalid_masks_are_refused(mask):
    with pytest.raises(WeightwiseError):
        SparseAdam({"w": _layer().weight}, {"w": mask}, lr=0.1)

