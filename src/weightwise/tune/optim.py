"""Adam whose state lives on a sparse mask: memory close to LoRA's, not full fine-tuning's.

For each trained weight W only k masked entries (flat indices into ``W.view(-1)``) are updated.
The optimizer keeps, per weight, the mask (compact gap-encoded indices, about 1 byte per entry at 5 %
density, see :mod:`weightwise.tune.indices`; decoded to int64 for a moment when used), the two Adam
moments (fp32, length k) and a gradient buffer (fp32, length k). A post-accumulate-grad hook reduces each dense gradient to its
masked entries the moment autograd finishes it and frees it (``p.grad = None``), so dense weight
gradients never pile up during the backward pass. Micro-batches accumulate into the
buffer; :meth:`SparseAdam.step` applies bias-corrected Adam (decoupled, AdamW-style weight decay on
the masked entries only) and clears the buffers.

Refreshing the mask (:meth:`SparseAdam.remask`): entries that stay keep their moments, entries that
join start from zero moments *and their own bias correction* — an entry that joined at step s is
corrected with 1 − β^(t − s), exactly like a fresh Adam; with the weight's global t instead, its
zero-initialised second moment would be under-corrected and its first updates up to ~6× too large
for the default betas. The per-entry join step (int32) is stored only once a refresh has added
entries after step 0. Entries that leave lose their moments.

Persistent state is therefore ≈ 9 bytes per trained entry (two fp32 moments + ~1 byte of index) instead
of 16 with int64 indices; the decoded int64 indices of one weight exist only during its hook or update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.tune.indices import decode_indices, encode_indices

_HPARAMS = ("lr", "beta1", "beta2", "eps", "weight_decay")
_TENSOR_FIELDS = ("indices", "exp_avg", "exp_avg_sq", "born")  # state_dict keys per weight


@dataclass
class _Masked:
    """Sparse Adam state of one weight."""

    param: nn.Parameter
    gaps: torch.Tensor  # the mask, encoded by encode_indices
    escapes: torch.Tensor | None
    exp_avg: torch.Tensor  # fp32 (k,)
    exp_avg_sq: torch.Tensor  # fp32 (k,)
    grad: torch.Tensor  # fp32 (k,): masked gradient accumulated since the last step
    born: torch.Tensor | None = None  # int32 (k,): step after which each entry joined; None = all at 0

    @classmethod
    def fresh(cls, param: nn.Parameter, indices: torch.Tensor) -> "_Masked":
        zeros = torch.zeros(indices.numel(), dtype=torch.float32, device=param.device)
        return cls(param, *encode_indices(indices), zeros, zeros.clone(), zeros.clone())

    def indices(self) -> torch.Tensor:
        """The mask as sorted int64 flat indices (decoded on each call)."""
        return decode_indices(self.gaps, self.escapes)

    def set_indices(self, indices: torch.Tensor) -> None:
        self.gaps, self.escapes = encode_indices(indices)

    def nbytes(self) -> int:
        tensors = (self.gaps, self.escapes, self.exp_avg, self.exp_avg_sq, self.born)
        return sum(t.nbytes for t in tensors if t is not None)


def _check_indices(name: str, indices: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Validated int64 copy of a mask on ``param``'s device: 1-D, sorted, unique, in range, non-empty."""
    if not isinstance(indices, torch.Tensor) or indices.ndim != 1 or indices.is_floating_point() or indices.is_complex():
        raise WeightwiseError(f"mask of {name!r} must be a 1-D integer tensor of flat indices")
    idx = indices.to(device=param.device, dtype=torch.long)
    if idx.numel() == 0 or idx.numel() > param.numel():
        raise WeightwiseError(f"mask of {name!r} has {idx.numel()} entries; it needs 1 to {param.numel()}")
    if int(idx[0]) < 0 or int(idx[-1]) >= param.numel() or not bool((idx[1:] > idx[:-1]).all()):
        raise WeightwiseError(f"mask of {name!r} must hold sorted, unique flat indices in [0, {param.numel()})")
    return idx


class SparseAdam:
    """Adam over the masked entries only: 1-D moments of length k per weight; dense grads reduced to
    the masked entries by post-accumulate-grad hooks and freed at once.

    Use: ``opt.attach_hooks()`` once; then per optimisation step one or more ``loss.backward()``
    (micro-batches add up), optionally scale/all-reduce :meth:`grad_buffers`, then :meth:`step`.
    ``lr`` is a public attribute a scheduler may change between steps.
    """

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        masks: dict[str, torch.Tensor],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if set(params) != set(masks):
            raise WeightwiseError(f"params and masks name different weights: {sorted(set(params) ^ set(masks))}")
        if not lr >= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not eps > 0 or not weight_decay >= 0:
            raise WeightwiseError(f"invalid Adam settings lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}: "
                                  "need lr ≥ 0, 0 ≤ β < 1, eps > 0, weight_decay ≥ 0")
        self.lr, self.eps, self.weight_decay = float(lr), float(eps), float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.step_count = 0
        self._state: dict[str, _Masked] = {}
        self._handles: list = []
        for name, p in params.items():
            if not p.is_contiguous() or not p.is_floating_point():
                raise WeightwiseError(f"{name!r} must be a contiguous floating-point tensor for sparse updates")
            self._state[name] = _Masked.fresh(p, _check_indices(name, masks[name], p))

    # -- gradients ---------------------------------------------------------------------------------

    def _hook(self, name: str):
        def reduce_and_free(p: torch.Tensor) -> None:
            s = self._state[name]
            s.grad.add_(p.grad.reshape(-1).index_select(0, s.indices()))
            p.grad = None

        return reduce_and_free

    def attach_hooks(self) -> None:
        """Register one post-accumulate-grad hook per weight (idempotent)."""
        if self._handles:
            return
        for name, s in self._state.items():
            if not s.param.requires_grad:
                raise WeightwiseError(f"{name!r} does not require grad; set requires_grad=True on the trained weights")
            self._handles.append(s.param.register_post_accumulate_grad_hook(self._hook(name)))

    def detach_hooks(self) -> None:
        """Remove the hooks; later backward passes leave dense grads in ``p.grad`` again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def grad_buffers(self) -> dict[str, torch.Tensor]:
        """The accumulated masked gradients (fp32, 1-D, aligned with the masks); edit them in place."""
        return {name: s.grad for name, s in self._state.items()}

    def zero_grad(self) -> None:
        """Clear the masked gradient buffers (and any dense grad left on the weights)."""
        for s in self._state.values():
            s.grad.zero_()
            s.param.grad = None

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Current flat indices per weight (decoded copies; change a mask with :meth:`remask`)."""
        return {name: s.indices() for name, s in self._state.items()}

    # -- update ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """One bias-corrected Adam step on every weight's masked entries; then clears the buffers.

        Same arithmetic as ``torch.optim.AdamW`` (``torch.optim.Adam`` when weight_decay = 0) on the
        masked entries: computed in fp32 and written back in the weight's dtype.
        """
        self.step_count += 1
        t = self.step_count
        beta1, beta2 = self.betas
        for name, s in self._state.items():
            if s.param.grad is not None:
                raise RuntimeError(f"{name!r} holds a dense grad: call attach_hooks() before backward()")
            flat = s.param.detach().view(-1)
            indices = s.indices()
            values = flat.index_select(0, indices).float()
            if self.weight_decay:
                values.mul_(1 - self.lr * self.weight_decay)
            s.exp_avg.lerp_(s.grad, 1 - beta1)
            s.exp_avg_sq.mul_(beta2).addcmul_(s.grad, s.grad, value=1 - beta2)
            if s.born is None:
                bias_correction1, bias_correction2 = 1 - beta1**t, 1 - beta2**t
                denom = (s.exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(self.eps)
                values.addcdiv_(s.exp_avg, denom, value=-self.lr / bias_correction1)
            else:
                age = (t - s.born).to(torch.float64)
                step_size = (self.lr / (1 - beta1**age)).float()
                denom = (s.exp_avg_sq.sqrt() / (1 - beta2**age).sqrt().float()).add_(self.eps)
                values.sub_(step_size * s.exp_avg / denom)
            flat.index_copy_(0, indices, values.to(flat.dtype))
            s.grad.zero_()

    def remask(self, name: str, indices: torch.Tensor) -> dict:
        """Move ``name``'s mask to ``indices``; kept entries keep moments, new ones start at zero.

        Call it between :meth:`step` and the next backward: the gradient buffer restarts at zero.
        Returns {"kept", "new", "dropped"} entry counts.
        """
        if name not in self._state:
            raise WeightwiseError(f"no trained weight named {name!r}")
        s = self._state[name]
        new = _check_indices(name, indices, s.param)
        old_indices = s.indices()
        pos = torch.searchsorted(old_indices, new).clamp_(max=old_indices.numel() - 1)
        found = old_indices[pos] == new
        source = pos[found]
        moments = []
        for old in (s.exp_avg, s.exp_avg_sq):
            fresh = torch.zeros(new.numel(), dtype=torch.float32, device=new.device)
            fresh[found] = old[source]
            moments.append(fresh)
        kept = int(found.sum())
        n_new = new.numel() - kept
        if s.born is not None or (n_new and self.step_count > 0):
            born = torch.full((new.numel(),), self.step_count, dtype=torch.int32, device=new.device)
            born[found] = s.born[source] if s.born is not None else 0
            s.born = born
        dropped = old_indices.numel() - kept
        s.set_indices(new)
        s.exp_avg, s.exp_avg_sq = moments
        s.grad = torch.zeros(new.numel(), dtype=torch.float32, device=new.device)
        return {"kept": kept, "new": n_new, "dropped": dropped}

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor | int | float]:
        """Flat, safetensors-ready state: tensors go to a .safetensors file, scalars to JSON.

        Keys: ``"step"`` (int) and ``"lr"``, ``"beta1"``, ``"beta2"``, ``"eps"``, ``"weight_decay"``
        (float); per weight ``"<name>.indices"`` (int64), ``"<name>.exp_avg"``,
        ``"<name>.exp_avg_sq"`` (fp32) and, after a refresh that added entries, ``"<name>.born"``
        (int32). Tensors are copies. Pending gradient buffers are not saved (save after a step).
        """
        out: dict[str, torch.Tensor | int | float] = {"step": self.step_count, "lr": self.lr, "beta1": self.betas[0],
                                                      "beta2": self.betas[1], "eps": self.eps, "weight_decay": self.weight_decay}
        for name, s in self._state.items():
            out[f"{name}.indices"] = s.indices()
            for field in _TENSOR_FIELDS[1:]:
                value = getattr(s, field)
                if value is not None:
                    out[f"{name}.{field}"] = value.detach().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor | int | float]) -> None:
        """Restore :meth:`state_dict` output (tensors may come back on the CPU); clears the buffers."""
        missing = [key for key in ("step", *_HPARAMS) if key not in state]
        names = {key.rsplit(".", 1)[0] for key in state if isinstance(state[key], torch.Tensor)}
        if missing or names != set(self._state):
            raise WeightwiseError(f"optimizer state does not match this model (missing scalars {missing}, weights differ by "
                                  f"{sorted(names ^ set(self._state))[:5]}); resume with the same model and method settings")
        for name, s in self._state.items():
            idx = _check_indices(name, state[f"{name}.indices"], s.param)
            fields = {f: state.get(f"{name}.{f}") for f in _TENSOR_FIELDS[1:]}
            moments = (fields["exp_avg"], fields["exp_avg_sq"])
            if any(v is None for v in moments) or any(v is not None and v.shape != idx.shape for v in fields.values()):
                raise WeightwiseError(f"optimizer state of {name!r} is incomplete or its moments do not match its mask")
            s.set_indices(idx)
            s.exp_avg = fields["exp_avg"].to(device=idx.device, dtype=torch.float32).clone()
            s.exp_avg_sq = fields["exp_avg_sq"].to(device=idx.device, dtype=torch.float32).clone()
            s.born = None if fields["born"] is None else fields["born"].to(device=idx.device, dtype=torch.int32).clone()
            s.grad = torch.zeros(idx.numel(), dtype=torch.float32, device=idx.device)
        self.step_count = int(state["step"])
        self.lr, self.eps, self.weight_decay = float(state["lr"]), float(state["eps"]), float(state["weight_decay"])
        self.betas = (float(state["beta1"]), float(state["beta2"]))

    def state_bytes(self) -> int:
        """Bytes of persistent optimizer state: moments (2·4·k) + encoded mask (≈ k) + join steps (4·k, after a refresh)."""
        return sum(s.nbytes() for s in self._state.values())
