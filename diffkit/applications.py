"""What a trained diffusion model can do besides sampling: inpainting, denoising
(image-to-image, SDEdit) and super-resolution (ILVR).

Each is a function of a :class:`~diffkit.pipeline.Pipeline` and works with every
sampler, because each touches the reverse process only through the sampler protocol:

- ``callback(t, x_t)`` replaces each state the sampler reaches (inpainting pastes the
  forward-noised known pixels in; ILVR swaps the state's low frequencies for the
  reference's);
- ``x_start`` and ``t_start`` start the reverse process from a partly noised input
  (SDEdit).

Inputs and outputs are in the data's own coordinates (images in [−1, 1]); the work is
done in model space, where the pipeline standardises point data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffkit.errors import DiffkitError
from diffkit.noise import APPLICATION, SampleNoise, fresh_seed
from diffkit.sampling import is_step_sampler, times_tensor
from diffkit.interfaces import Sampler, StepCallback

__all__ = [
    "inpaint",
    "denoise",
    "sdedit",
    "upscale",
    "ilvr",
    "strength_to_timestep",
    "strength_to_time",
    "check_strength",
    "masked_view",
    "low_pass",
    "read_input",
    "read_mask",
    "write_output",
]

SamplerChoice = str | Mapping[str, Any] | Sampler | None


# -- shared plumbing -------------------------------------------------------------------------
def _sampler(pipe: Any, sampler: SamplerChoice) -> Sampler:
    """The sampler to run, and a fresh bound on x̂_0 for it on the pipeline (what ``_run``
    applies and ``pipe.last_clipped`` reports)."""
    if sampler is None:
        chosen = pipe.sampler
    elif isinstance(sampler, (str, Mapping)):
        chosen = pipe.registry.build("sampler", sampler, pipe.context)
    else:
        chosen = sampler
    pipe._bound = pipe.x0_bound(chosen)
    return chosen


def _batch(pipe: Any, x: Tensor | Any, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
    """``x`` as a float tensor ``[N, *shape]`` (one sample of ``shape`` gains a batch axis)."""
    shape = tuple(pipe.context.sample_shape) if shape is None else shape
    x = torch.as_tensor(x).float()
    if tuple(x.shape) == shape:
        x = x.unsqueeze(0)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape or x.shape[0] < 1:
        raise DiffkitError(
            f"{name} must have shape [N, {', '.join(map(str, shape))}] (or one sample of shape {list(shape)}) for this"
            f" model, got {list(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise DiffkitError(f"{name} holds NaN or infinite values")
    return x


def _to_model(pipe: Any, x: Tensor) -> Tensor:
    # Point data are standardised by the pipeline; images are modelled as they are.
    return pipe._normalize(x) if pipe.data_mean is not None else x


def _generator(pipe: Any, seed: int | None) -> tuple[torch.Generator, int]:
    """The call's seed (a fresh one for ``None``) and a generator from it for samplers
    written as whole loops (plugin API 1); everything else draws per sample from the seed."""
    from diffkit.spec import check_seed

    seed = fresh_seed() if seed is None else check_seed(seed)
    return torch.Generator(device=pipe.device).manual_seed(seed), seed


def _check_steps(pipe: Any, steps: int | None) -> None:
    if steps is None:
        return
    if pipe.schedule.discrete and not 1 <= steps <= pipe.schedule.T:
        raise DiffkitError(f"steps must be between 1 and the schedule's T = {pipe.schedule.T}, got {steps}")
    if int(steps) != steps or steps < 1:
        raise DiffkitError(f"steps must be a whole number of at least 1, got {steps}")


def _chunks(n: int, batch_size: int | None) -> list[slice]:
    if batch_size is not None and batch_size < 1:
        raise DiffkitError(f"batch_size must be at least 1, got {batch_size}")
    size = batch_size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _run(
    pipe: Any,
    chosen: Sampler,
    shape: tuple[int, ...],
    generator: torch.Generator,
    steps: int | None,
    progress: bool,
    callback: StepCallback | None = None,
    x_start: Tensor | None = None,
    t_start: int | None = None,
    noise: SampleNoise | None = None,
) -> Tensor:
    predict = None
    if not is_step_sampler(chosen):  # a 0.1 sampler: the bound wraps its ε̂
        predict = pipe.predictor() if pipe._bound is None else pipe._bound(pipe.predictor())
    x = pipe.run_sampler(
        chosen,
        shape,
        predict=predict,
        bound=pipe._bound,
        generator=generator,
        steps=steps,
        progress=progress,
        callback=callback,
        x_start=x_start,
        t_start=t_start,
        noise=noise,
    )
    pipe._check_finite(x)
    return x


def _noised(pipe: Any, x0: Tensor, t: float, draws: SampleNoise) -> Tensor:
    """A draw of q(x_t | x_0) (x_0 itself at the clean time), per sample from the application's own stream."""
    noise = draws.next(APPLICATION, x0)
    return pipe.schedule.q_sample(x0, times_tensor(t, x0.shape[0], x0.device, pipe.schedule), noise)


class _Reached(Exception):
    """Stops a sampler once it reaches a given timestep (see :func:`_advance`)."""

    def __init__(self, x: Tensor) -> None:
        self.x = x


def _advance(
    pipe: Any,
    chosen: Sampler,
    x_t: Tensor,
    t: int,
    until: int,
    steps: int | None,
    generator: torch.Generator,
    constrain: Callable[[int, Tensor], Tensor],
    noise: SampleNoise,
) -> Tensor:
    """Run ``chosen`` from x_t at timestep t down to the state at timestep ``until`` (one of
    the timesteps it visits with these ``steps``), applying ``constrain`` to every state
    it reaches, and return that state: the sampler is started at (x_t, t) and stopped by
    its callback, so any sampler can take a few of its steps."""

    def callback(u: int, x_u: Tensor) -> Tensor | None:
        if u >= t:
            return None
        x_u = constrain(u, x_u)
        if u <= until:
            raise _Reached(x_u)
        return x_u

    try:
        _run(pipe, chosen, tuple(x_t.shape), generator, steps, False, callback, x_start=x_t, t_start=t, noise=noise)
    except _Reached as reached:
        return reached.x
    raise DiffkitError(f"the sampler {type(chosen).__name__} never reported the state at t = {until} to its callback")


# -- inpainting ------------------------------------------------------------------------------
def inpaint(
    pipe: Any,
    x: Tensor,
    mask: Tensor,
    *,
    sampler: SamplerChoice = None,
    steps: int | None = None,
    seed: int | None = None,
    resample: int = 1,
    jump: int = 1,
    batch_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Fill in the unknown part of ``x`` (``mask`` = 0) consistently with the known part
    (``mask`` = 1), which is returned exactly as given.

    At every state x_t the sampler reaches, the known entries are replaced by a fresh
    draw of q(x_t | x_0) of the known data (Song et al. 2021, Sec. 5 and App. I.2;
    Lugmayr et al. 2022, Eq. 8). Replacement alone leaves the generated part only
    loosely tied to the known part; RePaint's resampling (Lugmayr et al. 2022, Alg. 1 and
    Sec. 4.2) harmonises them: with ``resample`` = r > 1, after every ``jump`` = j steps
    the merged state x_s is noised back j steps, to the time t' the sampler visited
    j steps earlier, by the forward kernel q(x_{t'} | x_s) (on a VP table N(√(ᾱ_{t'}/ᾱ_s) x_s,
    (1 − ᾱ_{t'}/ᾱ_s) I); on any process :meth:`~diffkit.process.Process.transition`), and
    those j steps are taken again (with replacement), r − 1 times. That costs about r times the network evaluations of the steps.

    ``x``: ``[N, *sample_shape]`` in data coordinates (the unknown entries' values are
    ignored); ``mask``: of ``x``'s shape or broadcastable to it (e.g. ``[1, H, W]`` for
    every channel of every image), values 0 or 1.
    """
    _check_steps(pipe, steps)
    for name, value in (("resample", resample), ("jump", jump)):
        if int(value) != value or value < 1:
            raise DiffkitError(f"{name} must be a whole number of at least 1, got {value}")
    resample, jump = int(resample), int(jump)
    x = _batch(pipe, x, "the input")
    mask = torch.as_tensor(mask)
    if not ((mask == 0) | (mask == 1)).all():
        raise DiffkitError("the mask must hold only 0 (generate) and 1 (known)")
    try:
        known = torch.broadcast_to(mask.bool(), x.shape)
    except RuntimeError:
        raise DiffkitError(
            f"the mask's shape {list(mask.shape)} does not broadcast to the input's shape {list(x.shape)}"
        ) from None
    chosen = _sampler(pipe, sampler)
    generator, seed = _generator(pipe, seed)
    device = pipe.device
    out = []
    pipe.denoiser.eval()
    with torch.inference_mode():
        for part in _chunks(x.shape[0], batch_size):
            x0 = _to_model(pipe, x[part].to(device))
            m = known[part].to(device)
            seen: list[int] = []  # the timesteps of the states the outer walk reached
            draws = SampleNoise(seed, part.start, part.stop - part.start)
            nested = [0]  # the resampling runs so far: each draws its own noise

            def merge(t: int, x_t: Tensor) -> Tensor:
                return torch.where(m, _noised(pipe, x0, t, draws), x_t)

            def constrain(s: int, x_s: Tensor) -> Tensor:
                x_s = merge(s, x_s)
                seen.append(s)
                taken = len(seen) - 1  # steps taken so far
                if resample > 1 and taken > 0 and (taken % jump == 0 or s < 0):
                    back = seen[max(0, taken - jump)]
                    for _ in range(resample - 1):
                        noise = draws.next(APPLICATION + 1, x_s)
                        x_back = pipe.schedule.transition(x_s, s, back, noise)  # q(x_back | x_s)
                        nested[0] += 1
                        x_s = _advance(pipe, chosen, x_back, back, s, steps, generator, merge, draws.child(nested[0]))
                return x_s

            result = _run(pipe, chosen, tuple(x0.shape), generator, steps, progress, constrain, noise=draws)
            out.append(pipe.denormalize(result).cpu())
    # the known entries exactly as given, untouched by standardisation round trips
    return torch.where(known, x, torch.cat(out))


# -- denoising / image-to-image (SDEdit) -----------------------------------------------------
def strength_to_timestep(strength: float, T: int) -> int:
    """The timestep SDEdit starts from: t₀ = round(strength · T) − 1, at least 0
    (strength 1 starts from nearly pure noise at T − 1)."""
    check_strength(strength)
    return max(0, round(strength * T) - 1)


def strength_to_time(strength: float, process: Any) -> float:
    """The time SDEdit starts from: on a discrete table :func:`strength_to_timestep`; on a
    continuous process the time ``strength`` of the way up its default grid
    (:meth:`~diffkit.process.Process.time_at`: uniform in t for ``vp``, ``ve`` and
    ``rectified-flow``, in σ^{1/ρ} for ``edm``), so that strength ½ skips about half of
    every sampler's steps on every process."""
    check_strength(strength)
    if process.discrete:
        return float(strength_to_timestep(strength, process.T))
    return process.time_at(strength)


def check_strength(strength: float) -> None:
    """SDEdit's strength must lie in (0, 1]."""
    if not 0 < strength <= 1:  # also false for NaN
        raise DiffkitError(f"strength must lie in (0, 1], got {strength}")


def denoise(
    pipe: Any,
    x: Tensor,
    strength: float,
    *,
    sampler: SamplerChoice = None,
    steps: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """SDEdit (Meng et al. 2022, Alg. 1): noise the input to x_{t₀} ~ q(x_{t₀} | x)
    with t₀ = :func:`strength_to_time` and run the reverse process from there.

    A small strength keeps the input's content and removes fine noise; a large one keeps
    only its coarse layout and makes a new sample of the data (image-to-image). The
    sampler visits t₀ and then those of its ``steps`` timesteps below t₀, so a strength
    of ½ costs about half of ``steps`` network evaluations.
    """
    _check_steps(pipe, steps)
    x = _batch(pipe, x, "the input")
    t0 = strength_to_time(strength, pipe.schedule)
    chosen = _sampler(pipe, sampler)
    generator, seed = _generator(pipe, seed)
    out = []
    pipe.denoiser.eval()
    with torch.inference_mode():
        for part in _chunks(x.shape[0], batch_size):
            x0 = _to_model(pipe, x[part].to(pipe.device))
            draws = SampleNoise(seed, part.start, part.stop - part.start)
            x_start = _noised(pipe, x0, t0, draws)
            result = _run(
                pipe, chosen, tuple(x0.shape), generator, steps, progress, x_start=x_start, t_start=t0, noise=draws
            )
            out.append(pipe.denormalize(result).cpu())
    return torch.cat(out)


sdedit = denoise


# -- super-resolution (ILVR) -----------------------------------------------------------------
def low_pass(x: Tensor, factor: int) -> Tensor:
    """φ_N(x): average each factor × factor block, then repeat it back to full size. It is
    a projection (φ∘φ = φ), so matching φ of the state to φ of the reference makes the
    state's block averages equal the reference's exactly."""
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")


def upscale(
    pipe: Any,
    low: Tensor,
    *,
    factor: int | None = None,
    sampler: SamplerChoice = None,
    steps: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """ILVR (Choi et al. 2021, Alg. 1): an image of the model's size whose downsampling
    (the mean of each factor × factor block) equals ``low``.

    After every step the state's low frequencies are swapped for those of the reference
    noised to the same timestep, x_s ← x_s − φ(x_s) + φ(y_s) with y_s ~ q(y_s | up(low)),
    where φ = :func:`low_pass` and up repeats each pixel; at the end y = up(low) exactly.
    ``low``: ``[N, C, H/f, W/f]`` images in [−1, 1]; ``factor`` f is inferred from the
    shapes when not given.
    """
    _check_steps(pipe, steps)
    shape = tuple(pipe.context.sample_shape)
    if pipe.context.data_kind != "images" or len(shape) != 3:
        raise DiffkitError("upscale needs a model of images (C, H, W); this one models points")
    C, H, W = shape
    low = torch.as_tensor(low).float()
    if low.ndim == 3:
        low = low.unsqueeze(0)
    if low.ndim != 4 or low.shape[1] != C:
        raise DiffkitError(f"the low-resolution input must have shape [N, {C}, h, w], got {list(low.shape)}")
    h, w = low.shape[2:]
    if factor is None:
        factor = H // h if h > 0 else 0
    if factor < 1 or h * factor != H or w * factor != W:
        raise DiffkitError(
            f"the low-resolution input is {h}×{w}; it must be the model's {H}×{W} divided by a whole factor"
            + (f" (factor {factor} gives {H // factor}×{W // factor})" if factor >= 1 else "")
        )
    low = _batch(pipe, low, "the low-resolution input", (C, h, w))
    chosen = _sampler(pipe, sampler)
    generator, seed = _generator(pipe, seed)
    out = []
    pipe.denoiser.eval()
    with torch.inference_mode():
        for part in _chunks(low.shape[0], batch_size):
            reference = F.interpolate(_to_model(pipe, low[part].to(pipe.device)), scale_factor=factor, mode="nearest")
            draws = SampleNoise(seed, part.start, part.stop - part.start)

            def refine(t: int, x_t: Tensor) -> Tensor:
                y_t = _noised(pipe, reference, t, draws)
                return x_t - low_pass(x_t, factor) + low_pass(y_t, factor)

            result = _run(pipe, chosen, (reference.shape[0], *shape), generator, steps, progress, refine, noise=draws)
            out.append(pipe.denormalize(result).cpu())
    return torch.cat(out)


ilvr = upscale


def masked_view(x: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """``x`` with its unknown entries (mask 0) set to ``fill`` (mid-grey for images), to
    show what an inpainting started from."""
    return torch.where(torch.as_tensor(mask).bool(), torch.as_tensor(x).float(), fill)


# -- files (for the command line) ------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
OUTPUT_SUFFIXES = (".npy", ".png")
MAX_INPUT_PIXELS = 4096 * 4096
"""The largest image an application reads: 16 times the pixels of the largest model
(1024 × 1024) and 200 MB as float32 RGB. Beyond it, a small compressed file (a
decompression bomb) could claim gigabytes once decoded."""


def read_input(path: str | Path, channels: int | None = None) -> Tensor:
    """An ``.npy`` array (values in data coordinates, as they are), or one image file
    converted to ``[1, C, H, W]`` in [−1, 1] (grey for ``channels`` = 1, else RGB)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DiffkitError(f"{path} does not exist or is not a file")
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise DiffkitError(f"{path} is not a readable .npy array ({exc})") from None
        if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
            raise DiffkitError(f"{path} holds {array.dtype} values; it must hold numbers")
        return torch.from_numpy(np.asarray(array, dtype=np.float32))
    if suffix in IMAGE_SUFFIXES:
        import re
        import warnings

        from PIL import Image, UnidentifiedImageError

        def too_large(pixels: int | None, size: str = "") -> DiffkitError:
            count = f"{pixels:,} pixels{size}" if pixels is not None else "too many pixels"
            return DiffkitError(
                f"{path} has {count}, more than the {MAX_INPUT_PIXELS:,} an input image may have"
                " (it may be a decompression bomb); resize it to the model's size first"
            )

        try:
            # PIL warns past its own limit and refuses twice that when opening; the size in
            # the header is checked here, against a lower limit, before a pixel is decoded.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    if img.width * img.height > MAX_INPUT_PIXELS:
                        raise too_large(img.width * img.height, f" ({img.width}×{img.height})")
                    pixels = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))  # PIL: "Image size (N pixels) exceeds limit ..."
            raise too_large(int(found.group(1)) if found else None) from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:  # ValueError: oversized PNG text chunks
            raise DiffkitError(f"{path} is not a readable image ({' '.join(str(exc).split())})") from None
        x = torch.from_numpy(pixels)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return (x / 127.5 - 1.0).unsqueeze(0)
    raise DiffkitError(f"{path.name}: give an .npy array or an image ({', '.join(IMAGE_SUFFIXES)})")


def read_mask(path: str | Path, channels: int | None = None) -> Tensor:
    """A mask from an ``.npy`` array of 0/1 (kept as given, and checked by the
    application) or an image, where bright pixels (> ½) are known."""
    mask = read_input(path, channels)
    if Path(path).suffix.lower() != ".npy":
        mask = (mask > 0).float()
    return mask


def write_output(pipe: Any, x: Tensor, path: str | Path, reference: Tensor | None = None) -> Path:
    """Samples in data coordinates as ``.npy``, or as a picture (``.png``): an image grid,
    with the ``reference`` images (e.g. the inputs) as a first row if given; a scatter of
    points, beside the reference points if given."""
    from diffkit import checkpoint, plotting

    path = Path(path)
    if path.suffix.lower() == ".npy":
        array = x.detach().cpu().numpy().astype(np.float32)

        def write(p: Path) -> None:
            with open(p, "wb") as fh:  # a file object: np.save would append .npy to a path
                np.save(fh, array, allow_pickle=False)

        return checkpoint.atomic_write(path, write)
    if path.suffix.lower() != ".png":
        raise DiffkitError(f"--out must end in {' or '.join(OUTPUT_SUFFIXES)}, got '{path.name}'")
    if pipe.context.data_kind == "images":
        if reference is None or x.shape[0] > 16:  # a reference row only where it stays readable
            return plotting.image_grid(x, path)
        ref = reference
        if ref.shape[1:] != x.shape[1:]:  # a low-resolution reference: shown at full size
            ref = F.interpolate(ref, size=tuple(x.shape[2:]), mode="nearest")
        return plotting.image_grid(torch.cat([ref, x]), path, nrow=x.shape[0])
    return plotting.scatter(x, path, reference=reference)
