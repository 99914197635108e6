"""How much memory a network would take, checked before it is allocated.

A spec (or a run directory's ``spec.yaml``) can ask for a network far larger than the
machine: ``denoiser: {hidden: 65536, depth: 64}`` is 800 billion parameters. The network
is built once on PyTorch's ``meta`` device, which allocates nothing, to count its
parameters and buffers; the real one is built only if its weights fit in the memory
available (``MemAvailable`` of ``/proc/meminfo``, or what a container's cgroup still
allows where that is less), or in ``DIFFKIT_MEMORY_LIMIT``
(``"8GB"``, ``"512MB"``, a number of bytes) where that is set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from itertools import chain

import torch
from torch import nn

from diffkit.errors import DiffkitError

__all__ = [
    "MEMORY_LIMIT_ENV",
    "WEIGHT_COPIES",
    "TRAINING_COPIES",
    "memory_limit",
    "network_bytes",
    "module_bytes",
    "check_network_size",
    "format_bytes",
]

MEMORY_LIMIT_ENV = "DIFFKIT_MEMORY_LIMIT"
WEIGHT_COPIES = 2
"""Copies of a network's weights a pipeline holds: the weights and their EMA (training),
or the EMA and the raw weights read back from a run directory."""
TRAINING_COPIES = 5
"""Copies training holds: the weights, their EMA, the gradients and AdamW's two moments."""

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def memory_limit(device: torch.device | None = None) -> int | None:
    """Bytes a network's weights may take: ``DIFFKIT_MEMORY_LIMIT`` where set, else the
    memory available now (on a CUDA ``device``, its free memory); ``None`` where neither
    is known (no check)."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if text:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", text)
        if m is None or m.group(2).lower() not in _UNITS:
            raise DiffkitError(
                f"{MEMORY_LIMIT_ENV}={text!r} is not an amount of memory; write it as bytes or with a unit, e.g. 8GB or"
                " 512MB"
            )
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if device is not None and device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    available = _meminfo_available()
    container = _cgroup_room()  # a container's own limit, below the machine's
    if available is None or container is None:
        return container if available is None else available
    return min(available, container)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_room() -> int | None:
    """What the cgroup (v2) this process runs in still allows, where it sets a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as fh:
            used = int(fh.read().strip())
        return None if limit == "max" else max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def network_bytes(build: Callable[[], nn.Module]) -> int | None:
    """Bytes of the parameters and buffers of the network ``build()`` returns, counted on
    the meta device (nothing allocated, torch's random state untouched); ``None`` where
    the network cannot be built there."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            net = build()
    except (RuntimeError, NotImplementedError, TypeError):  # a factory that needs real data to build
        return None
    if not isinstance(net, nn.Module):
        return None
    return module_bytes(net)


def module_bytes(net: nn.Module) -> int:
    """Bytes of a network's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in chain(net.parameters(), net.buffers()))


def check_network_size(
    nbytes: int,
    what: str,
    fields: list[str],
    copies: int = WEIGHT_COPIES,
    held: str = "with their EMA copy",
    device: torch.device | None = None,
) -> None:
    """Refuse a network whose ``copies`` copies of weights (``held`` says which) would not
    fit in :func:`memory_limit`, naming the spec ``fields`` that set its size."""
    limit = memory_limit(device)
    need = copies * nbytes
    if limit is None or need <= limit:
        return
    if os.environ.get(MEMORY_LIMIT_ENV, "").strip():
        source = "the limit DIFFKIT_MEMORY_LIMIT sets"
    else:
        source = f"the memory free on {device}" if device is not None and device.type == "cuda" else "the memory available"
    knobs = " or ".join(fields) if fields else f"the {what}'s size"
    raise DiffkitError(
        f"the {what} would take {format_bytes(nbytes)} of weights ({format_bytes(need)} {held}), more than"
        f" {source} ({format_bytes(limit)}); make {knobs} smaller, or set {MEMORY_LIMIT_ENV} (e.g. 64GB) if the"
        " machine has the memory"
    )
