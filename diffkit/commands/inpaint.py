"""``diffkit inpaint RUN --input X --mask M --out OUT``: fill in the unknown part of inputs.

Also home of the options and plumbing that ``denoise`` and ``upscale`` share with it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from diffkit.errors import DiffkitError


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """RUN, --input, --out and the sampling options every application takes."""
    from diffkit.cli import add_guidance_options, add_plugin_options

    p.add_argument("run", help="run directory written by `diffkit train`")
    p.add_argument("--out", required=True, help="output file: .npy (data coordinates) or .png (picture)")
    p.add_argument("--seed", type=int, help="seed of the sampler's noise (default: random)")
    p.add_argument("--sampler", help="use this registered sampler, with its default parameters, instead of the spec's")
    p.add_argument("--steps", type=int, help="number of reverse steps of the full schedule (default: the sampler's)")
    p.add_argument("--batch-size", type=int, help="process the inputs in chunks of this size to bound memory")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu", help="where to run (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_guidance_options(p)
    add_plugin_options(p)


def run_application(
    args: argparse.Namespace, what: str, apply: Callable[[Any, dict[str, Any]], tuple[Tensor, Tensor | None]]
) -> int:
    """Check the common options, load the run, call ``apply(pipe, common_kwargs)`` and
    write what it returns to ``--out`` (with the inputs beside it in a picture)."""
    from diffkit import applications as A
    from diffkit.cli import check_guidance_asked, guidance_options, load_registry
    from diffkit.pipeline import Pipeline

    out = Path(args.out)
    if out.suffix.lower() not in A.OUTPUT_SUFFIXES:
        raise DiffkitError(f"--out must end in {' or '.join(A.OUTPUT_SUFFIXES)}, got '{out.name}'")
    if args.steps is not None and args.steps < 1:
        raise DiffkitError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise DiffkitError(f"--batch-size must be at least 1, got {args.batch_size}")
    options = guidance_options(args)
    pipe = Pipeline.load(args.run, load_registry(args), device=args.device)
    check_guidance_asked(pipe, options, False, how="labels, and this command takes none (a guidance without labels,"
                         " such as autoguidance, guides here)")
    if hasattr(pipe.guidance, "with_options"):  # the run's guidance, with the options asked for, guides every step
        pipe.guidance = pipe.guidance.with_options(
            scale=options["scale"], interval=options["interval"], rescale=options["rescale_phi"]
        )
    common = {
        "sampler": args.sampler,
        "steps": args.steps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "progress": not args.no_progress,
    }
    start = time.perf_counter()
    result, reference = apply(pipe, common)
    seconds = time.perf_counter() - start
    A.write_output(pipe, result, out, reference=reference)
    print(f"{what} {result.shape[0]} input{'s' if result.shape[0] != 1 else ''} in {seconds:.1f} s; wrote {out}")
    return 0


def channels(pipe: Any) -> int | None:
    """The image channels the model expects, to read image files with (None for points)."""
    shape = pipe.context.sample_shape
    return shape[0] if pipe.context.data_kind == "images" and len(shape) == 3 else None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inpaint",
        help="fill in the unknown part of inputs consistently with the known part",
        description="Keep the known entries (mask 1) of each input exactly and generate the rest (mask 0):"
        " the known part is forward-noised into every state of the reverse process.",
    )
    add_generation_options(p)
    p.add_argument("--input", required=True, help="inputs: .npy [N, ...] in data coordinates, or one image file")
    p.add_argument(
        "--mask",
        required=True,
        help="1 = known, 0 = generate: .npy of the inputs' shape (or broadcastable to it), or an image (white = known)",
    )
    p.add_argument(
        "--resample",
        type=int,
        default=1,
        help="RePaint resampling: redo every --jump steps this many times, noising back in between"
        " (costs about that many times the network evaluations; default 1, none)",
    )
    p.add_argument("--jump", type=int, default=1, help="steps between RePaint's jumps back (default 1)")
    p.set_defaults(func=cmd_inpaint)


def cmd_inpaint(args: argparse.Namespace) -> int:
    from diffkit import applications as A

    if args.resample < 1:
        raise DiffkitError(f"--resample must be at least 1, got {args.resample}")
    if args.jump < 1:
        raise DiffkitError(f"--jump must be at least 1, got {args.jump}")

    def apply(pipe: Any, common: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        x = A.read_input(args.input, channels(pipe))
        mask = A.read_mask(args.mask, channels(pipe))
        result = A.inpaint(pipe, x, mask, resample=args.resample, jump=args.jump, **common)
        shown = A.masked_view(x, mask) if pipe.context.data_kind == "images" else None
        return result, shown

    return run_application(args, "inpainted", apply)
