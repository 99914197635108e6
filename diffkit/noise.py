"""Per-sample noise: every random number of sampling as a function of (seed, sample, step).

A seed reproduces a sample whatever else was drawn with it: sample ``i`` of
``sample(n, seed)`` is sample ``i`` of ``sample(m, seed)`` for any ``n, m > i`` and any
batch size, and the noise is the same on every device.

How: sample ``i`` of a draw seeded ``seed`` owns one random stream per *slot* (the
starting noise and the k-th draw of a step are slots), a CPU generator (MT19937)
seeded by a 64-bit hash of (seed, i, slot). Stream ``slot`` holds the noise of
position ``p`` (0 for the starting state, ``j + 1`` for step ``j``) at values
``[p·E, (p+1)·E)`` of its sequence, E the values per sample. The loop asks for
positions in order and :class:`SampleNoise` draws each stream ahead in chunks of whole
multiples of 16 values, for which torch's CPU normal sampler gives the same sequence
however it is cut (tested in ``tests/test_noise.py``), so the chunking, the batch and
the number of samples change nothing. The noise is drawn on the CPU and moved to the
sampling device: the same numbers on CPU, CUDA and MPS (only the network's float
rounding differs between devices).

Samplers see none of this: ``ctx.noise(x)`` in a step is the next slot of the step.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["SampleNoise", "sample_seed", "fresh_seed", "NoiseMode", "PRIOR", "APPLICATION", "CHUNK_VALUES"]

NoiseMode = Literal["per-sample", "batch"]
"""``per-sample``: :class:`SampleNoise` (the default); ``batch``: one generator drawn in order
across the batch, as 0.1 drew it (samples then depend on the batch size)."""

PRIOR = 0
"""The slot of the starting state x_T (position 0); step ``j``'s first draw is slot 0 at position ``j + 1``."""

APPLICATION = 1 << 20
"""First slot of an application's own draws (inpainting's noised known region, SDEdit's start)."""

CHUNK_VALUES = 1 << 22
"""Values drawn ahead per stream chunk, over all samples of a batch (16 MiB of float32)."""

_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    """SplitMix64's finaliser (Steele et al. 2014): a bijective 64-bit hash."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def fresh_seed() -> int:
    """A seed for a call given none: 63 random bits from the operating system."""
    return secrets.randbits(63)


def _stream_key(seed: int, slot: int, dtype: torch.dtype) -> int:
    return _mix(_mix(seed & _MASK) ^ ((slot << 1) | (1 if dtype == torch.float64 else 0)))


def sample_seed(seed: int, index: int, slot: int, dtype: torch.dtype = torch.float32) -> int:
    """The seed of sample ``index``'s stream ``slot`` under ``seed``, in [0, 2⁶⁴): a hash of the
    stream's key (seed, slot, dtype) and the index, distinct for distinct indices."""
    return _mix(_stream_key(seed, slot, dtype) ^ index)


def _mix_array(z: np.ndarray) -> np.ndarray:
    """:func:`_mix` of every entry of a uint64 array (numpy's uint64 arithmetic wraps modulo 2⁶⁴)."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


_GENERATORS = threading.local()


def _generator() -> torch.Generator:
    """This thread's CPU generator, reseeded for each stream (``manual_seed`` resets all of
    its state, the normal sampler's cache included), so that no generator is allocated per sample."""
    g = getattr(_GENERATORS, "g", None)
    if g is None:
        g = _GENERATORS.g = torch.Generator()
    return g


class _Stream:
    """Sample ``first + b``'s stream of one slot, b < count, drawn ahead chunk by chunk."""

    def __init__(
        self, seed: int, first: int, count: int, slot: int, width: int, dtype: torch.dtype, positions: int | None
    ) -> None:
        self.width = width
        self.dtype = dtype
        key = np.uint64(_stream_key(seed, slot, dtype))
        self.seeds = _mix_array(key ^ np.arange(first, first + count, dtype=np.uint64)).tolist()
        self.states: list[Tensor | None] = [None] * count  # each sample's generator state after its last chunk
        # positions per chunk: a whole number of 16-value blocks, within CHUNK_VALUES for the batch
        unit = 16 // math.gcd(width, 16)
        per = max(1, CHUNK_VALUES // max(1, count * width * unit)) * unit
        # ahead: the run's positions where known, else a few dozen at a time
        ahead = positions if positions is not None else 64
        per = min(per, -(-ahead // unit) * unit)
        self.per_chunk = per
        self.positions = positions
        self.start = 0  # first position held in ``chunk``
        self.chunk: Tensor | None = None  # [count, per_chunk, width]

    def _next_chunk(self) -> None:
        n = self.per_chunk * self.width
        chunk = torch.empty((len(self.seeds), n), dtype=self.dtype)
        g = _generator()
        first = self.chunk is None
        start = self.start if first else self.start + self.per_chunk
        # the streams go on past this chunk unless the run's positions end within it
        more = self.positions is None or start + self.per_chunk < self.positions
        for b, (seed, row) in enumerate(zip(self.seeds, chunk.unbind(0))):
            state = None if first else self.states[b]
            if state is not None:
                g.set_state(state)
            else:  # from the stream's start (asked past the run's positions): skip what was drawn
                g.manual_seed(seed)
                if start:
                    torch.empty(start * self.width, dtype=self.dtype).normal_(generator=g)
            row.normal_(generator=g)  # torch.randn(n, generator=g)'s values, written in place
            if more:
                self.states[b] = g.get_state()
        self.start = start
        self.chunk = chunk.view(len(self.seeds), self.per_chunk, self.width)

    def at(self, position: int) -> Tensor:
        if self.chunk is None:
            self._next_chunk()
        if position < self.start:
            raise ValueError(f"noise of position {position} was asked after position {self.start}: draw in order")
        while position >= self.start + self.per_chunk:
            self._next_chunk()
        assert self.chunk is not None
        return self.chunk[:, position - self.start]


class SampleNoise:
    """Standard normal noise for samples ``first, …, first + count − 1`` of a draw seeded ``seed``.

    ``normal(slot, position, like)`` is the noise of every sample of ``like`` (its first
    dimension is the ``count`` samples) at ``position`` of stream ``slot``, in ``like``'s
    dtype and on its device: a function of (seed, sample index, slot, position, element)
    alone. Positions of a slot are asked in increasing order; ``positions`` (the steps of
    the run, plus one) bounds how far ahead a stream is drawn, changing no value.
    """

    def __init__(self, seed: int, first: int = 0, count: int = 1, positions: int | None = None) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self.seed, self.first, self.count = int(seed), int(first), int(count)
        self.positions = positions
        self._next: dict[int, int] = {}
        self._streams: dict[tuple[int, tuple[int, ...], torch.dtype], _Stream] = {}

    def normal(self, slot: int, position: int, like: Tensor | Sequence[int], *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> Tensor:
        shape = tuple(like.shape) if isinstance(like, Tensor) else tuple(int(s) for s in like)
        if isinstance(like, Tensor):
            dtype = like.dtype if dtype is None else dtype
            device = like.device if device is None else device
        dtype = torch.float32 if dtype is None else dtype
        if not shape or shape[0] != self.count:
            raise ValueError(
                f"noise is drawn per sample: asked for shape {list(shape)}, whose first dimension should be the"
                f" {self.count} samples of this batch"
            )
        draw = torch.float64 if dtype == torch.float64 else torch.float32
        key = (slot, shape[1:], draw)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(
                self.seed, self.first, self.count, slot, math.prod(shape[1:]), draw, self.positions
            )
        z = stream.at(position).reshape(shape)
        if z.dtype != dtype or (device is not None and z.device != torch.device(device)):
            z = z.to(device=device, dtype=dtype)
        return z

    def next(self, slot: int, like: Tensor) -> Tensor:
        """The next position of stream ``slot`` (draws in sequence, for an application's own noise)."""
        position = self._next.get(slot, 0)
        self._next[slot] = position + 1
        return self.normal(slot, position, like)

    def child(self, index: int) -> SampleNoise:
        """Independent noise for the same samples, the ``index``-th of its kind (a nested run)."""
        return SampleNoise(_mix(self.seed ^ _mix(index ^ 0x5EED)), self.first, self.count, self.positions)

    def __repr__(self) -> str:
        return f"SampleNoise(seed={self.seed}, samples {self.first}..{self.first + self.count - 1})"
