"""Compiled sampling: the network through ``torch.compile``, cached on disk, with a fallback.

``Pipeline.sample(..., compile=True)`` (``diffkit sample --compile``) and ``train:
{compile: true}`` (``diffkit train --compile``) run the network compiled. The compiled kernels are kept on disk (``$DIFFKIT_CACHE``, else
``$XDG_CACHE_HOME/diffkit``, else ``~/.cache/diffkit``, under ``torchinductor``; an
explicit ``TORCHINDUCTOR_CACHE_DIR`` wins), so a second process skips code generation and
pays only the tracing. On CUDA the mode is ``reduce-overhead`` (CUDA graphs). Where
compilation fails (no C++ compiler, an operation the compiler does not support), one line
on stderr says why and the network runs as it is: sampling never fails for it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CompiledNetwork", "cache_dir"]


def cache_dir() -> Path:
    """Where compiled kernels are kept between runs."""
    explicit = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("DIFFKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "diffkit"
    )
    return Path(base) / "torchinductor"


class CompiledNetwork:
    """Calls ``net`` through ``torch.compile`` (built on the first call); falls back to
    ``net`` itself, saying why once, if compiling or running the compiled code fails."""

    def __init__(self, net: nn.Module, purpose: str = "sampling") -> None:
        self.net = net
        self.purpose = purpose
        self._compiled: Any = None
        self.failed: str | None = None

    def _build(self, device: torch.device) -> Any:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
        mode = "reduce-overhead" if device.type == "cuda" else None
        return torch.compile(self.net, mode=mode, dynamic=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            try:
                if self._compiled is None:
                    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
                    self._compiled = self._build(first.device if first is not None else torch.device("cpu"))
                return self._compiled(*args, **kwargs)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:  # the compiler's own failure: run uncompiled
                reason = " ".join(str(exc).split())[:300] or type(exc).__name__
                self.failed = f"{type(exc).__name__}: {reason}"
                print(
                    f"diffkit: compiling the network failed ({self.failed}); {self.purpose} without it", file=sys.stderr
                )
        return self.net(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.net, name)
