"""The few collective operations that tuning and quantization need, a no-op in a single process.

Under a launcher that starts one process per rank with the ``env://`` variables (WORLD_SIZE, RANK,
MASTER_ADDR, MASTER_PORT): ``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu
--num_processes N``, every process runs the same command and ``Comm.from_environment`` joins the group
(gloo for CPU tensors, nccl for GPU ones). ``accelerate launch --cpu`` starts more than one process only
through mpirun; without it, it runs one process.

No model is wrapped in DDP: the training loop sums the trained gradients itself (for sparse methods only
the k masked entries travel), so one code path serves every method and ``world`` processes × batch b/world
see the same global batch as one process × batch b. Quantization sums the calibration statistics of each
process's share of the batches and spreads a block's layers over the processes (``quantize.api``).
Payloads other than tensors travel as bytes (safetensors, JSON): nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Comm:
    """This process's rank among ``world`` processes; collectives are skipped when ``world == 1``.

    ``device`` is where the collectives' own small tensors live (the device of the trained weights).
    """

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device | None = None) -> Comm:
        """A single process, or the process group a launcher describes (WORLD_SIZE > 1), joined on first use."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(device=device)
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=device)

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` over processes in place (one flat buffer per dtype, one collective each)."""
        if self.world == 1 or not tensors:
            return
        import torch.distributed as dist

        for dtype in dict.fromkeys(t.dtype for t in tensors):
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def all_reduce_max(self, tensors: list[torch.Tensor]) -> None:
        """Element-wise maximum of ``tensors`` over processes, in place."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)

    def broadcast_bytes(self, payload: bytes | None, src: int) -> bytes:
        """``payload`` of process ``src`` on every process (the others pass None)."""
        if self.world == 1:
            return payload
        import torch.distributed as dist

        size = torch.tensor([len(payload) if self.rank == src else 0], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src)
        buffer = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device) if self.rank == src
                  else torch.empty(int(size.item()), dtype=torch.uint8, device=self.device))
        dist.broadcast(buffer, src)
        return payload if self.rank == src else buffer.cpu().numpy().tobytes()

    def broadcast(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with the values of process ``src``."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t, src)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def leave(self) -> None:
        """Wait for every process, then leave the group.

        A process that exits holding the group while a peer has already closed its side can abort in gloo's
        teardown ("terminate called without an active exception"), failing a command that succeeded.
        """
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def identical(self, tensors: list[torch.Tensor]) -> bool:
        """True when ``tensors`` hold the same bytes on every process (compares a SHA-256 prefix)."""
        if self.world == 1:
            return True
        digest = hashlib.sha256()
        for t in tensors:
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        value = int.from_bytes(digest.digest()[:7], "little")
        import torch.distributed as dist

        low = torch.tensor([value], dtype=torch.int64, device=self.device)
        high = low.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return int(low.item()) == int(high.item())


@contextmanager
def process_group(device: torch.device | None = None) -> Iterator[Comm]:
    """:meth:`Comm.from_environment` for one whole command, left together when the command succeeds.

    On an error the group is not waited for (the others may never arrive); the launcher stops them.
    """
    comm = Comm.from_environment(device)
    yield comm
    comm.leave()
