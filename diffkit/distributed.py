"""Data-parallel training under ``torchrun``: who this process is, and the few collectives
training needs.

``torchrun --nproc_per_node=N`` starts N copies of a command with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and a rendezvous address in the environment. :func:`setup` reads them,
joins the process group (NCCL on CUDA, gloo otherwise) and pins each process to its GPU.
Without them every function here works for a single process and does nothing collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from diffkit.errors import DiffkitError

__all__ = ["DistContext", "env_rank", "setup", "shutdown"]


def env_rank() -> int:
    """This process's rank as ``torchrun`` set it (0 outside ``torchrun``), readable before
    the process group exists: the CLI uses it to leave every file to rank 0."""
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class DistContext:
    """This process's place in a (possibly one-process) data-parallel job."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    """``"gloo"`` or ``"nccl"`` when the job has several processes; ``None`` alone."""

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics and pictures."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def _comm(self, t: Tensor) -> Tensor:
        # NCCL moves CUDA tensors only; gloo takes any CPU tensor
        return t.to(self.device) if self.backend == "nccl" else t.cpu()

    def all_sum(self, t: Tensor) -> Tensor:
        """The elementwise sum of ``t`` over the processes (``t`` itself alone)."""
        if not self.distributed:
            return t
        buf = self._comm(t.detach().clone())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """``t`` from every process, by rank, on the CPU; each process's ``t`` must have
        the same shape and dtype."""
        if not self.distributed:
            return [t.detach().cpu()]
        buf = self._comm(t.detach().contiguous())
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(out, buf)
        return [o.cpu() for o in out]


def setup(device: torch.device) -> DistContext:
    """This process's :class:`DistContext` for training on ``device``: under ``torchrun``
    (``WORLD_SIZE`` > 1) it joins the process group, once, and on CUDA takes the GPU
    ``LOCAL_RANK`` names."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    if "MASTER_ADDR" not in os.environ:
        raise DiffkitError(
            f"WORLD_SIZE is {world} but MASTER_ADDR is not set; start distributed training with"
            " torchrun --nproc_per_node=N, which sets both"
        )
    if device.type == "mps":
        raise DiffkitError("distributed training does not run on MPS; set train.device to 'cpu' or 'cuda'")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DiffkitError(
                f"LOCAL_RANK {local} has no GPU: this machine has {torch.cuda.device_count()};"
                " start at most that many processes per node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    elif dist.get_backend() != backend:
        raise DiffkitError(f"the process group uses {dist.get_backend()} but training on {device.type} needs {backend}")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, backend=backend)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
