"""``diffkit denoise RUN --input X --strength S --out OUT``: SDEdit (Meng et al. 2022)."""

from __future__ import annotations

import argparse
from typing import Any

from torch import Tensor

from diffkit.commands.inpaint import add_generation_options, channels, run_application


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "denoise",
        help="denoise or edit inputs: noise them to a strength, then run the reverse process (SDEdit)",
        description="Noise each input to the time `strength` of the way up the sampler's grid (the timestep"
        " round(strength·T) − 1 on a discrete table) and run the reverse process from there: a small strength"
        " removes noise and keeps the content, a large one re-imagines the input.",
    )
    add_generation_options(p)
    p.add_argument("--input", required=True, help="inputs: .npy [N, ...] in data coordinates, or one image file")
    p.add_argument(
        "--strength", type=float, required=True, help="in (0, 1]: how far to noise the input (1: almost pure noise)"
    )
    p.set_defaults(func=cmd_denoise)


def cmd_denoise(args: argparse.Namespace) -> int:
    from diffkit import applications as A

    A.check_strength(args.strength)  # before loading anything

    def apply(pipe: Any, common: dict[str, Any]) -> tuple[Tensor, Tensor]:
        x = A.read_input(args.input, channels(pipe))
        return A.denoise(pipe, x, args.strength, **common), x

    return run_application(args, "denoised", apply)
