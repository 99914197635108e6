"""``diffkit upscale RUN --input X --out OUT``: super-resolution by ILVR (Choi et al. 2021)."""

from __future__ import annotations

import argparse
from typing import Any

from torch import Tensor

from diffkit.commands.inpaint import add_generation_options, channels, run_application
from diffkit.errors import DiffkitError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upscale",
        help="generate full-size images whose downsampling equals low-resolution inputs (ILVR)",
        description="Super-resolution by iterative latent variable refinement: every state of the reverse"
        " process takes its low frequencies from the noised low-resolution input, so the result's"
        " factor × factor block means equal the input exactly.",
    )
    add_generation_options(p)
    p.add_argument("--input", required=True, help="low-resolution images: .npy [N, C, h, w] in [-1, 1], or one image")
    p.add_argument("--factor", type=int, help="upscaling factor (default: the model's size divided by the input's)")
    p.set_defaults(func=cmd_upscale)


def cmd_upscale(args: argparse.Namespace) -> int:
    from diffkit import applications as A

    if args.factor is not None and args.factor < 1:
        raise DiffkitError(f"--factor must be at least 1, got {args.factor}")

    def apply(pipe: Any, common: dict[str, Any]) -> tuple[Tensor, Tensor]:
        low = A.read_input(args.input, channels(pipe))
        return A.upscale(pipe, low, factor=args.factor, **common), low

    return run_application(args, "upscaled", apply)
