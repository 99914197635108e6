"""The ``diffkit`` command line.

Every user error ends as one message on stderr and a non-zero exit status:
1 for a problem with the input (spec, run directory, files), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffkit.errors import DiffkitError
from diffkit.plugins import load_plugins, set_registry
from diffkit.registry import Registry

SAMPLE_FORMATS = (".npy", ".png")


def add_plugin_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plugins")
    g.add_argument(
        "--no-autoload",
        action="store_true",
        help="load only the built-in plugins (same as DIFFKIT_DISABLE_PLUGIN_AUTOLOAD=1)",
    )
    g.add_argument("--plugin", action="append", default=None, metavar="NAME", help="load this plugin even with --no-autoload")
    g.add_argument(
        "--block",
        action="append",
        default=None,
        metavar="NAME",
        help="never load this plugin (repeatable); DIST:NAME blocks only the one distribution DIST provides, e.g. a"
        " third party's entry point named like a built-in (DIFFKIT_BLOCK_PLUGINS)",
    )
    g.add_argument("--strict-plugins", action="store_true", help="fail if any plugin fails to load (DIFFKIT_STRICT_PLUGINS=1)")


def load_registry(args: argparse.Namespace) -> Registry:
    registry = load_plugins(
        autoload=False if args.no_autoload else None,
        include=args.plugin,
        block=args.block,
        strict=True if args.strict_plugins else None,
    )
    set_registry(registry)
    for p in registry.failed():
        print(
            f"diffkit: warning: plugin '{p.name}' ({p.distribution or '?'} {p.version or ''}) failed to load: {p.error}",
            file=sys.stderr,
        )
    return registry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffkit",
        description="Train and sample diffusion models composed from plugins, declared in a spec file.",
    )
    parser.add_argument("--version", action="version", version=f"diffkit {_version()}")
    debug = "on an error, print its traceback before the one-line message"
    parser.add_argument("--debug", action="store_true", help=debug)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("plugins", help="list installed plugins and their components")
    p.add_argument("--json", action="store_true", help="print one JSON object per component instead of a table")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if a plugin fails to import, two components share a name, a hook has no matching hookspec,"
        " or the spec schema cannot be built (for plugin authors' CI)",
    )
    add_plugin_options(p)
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("validate", help="check a spec file; print every problem with its field path")
    p.add_argument("spec", help="spec file (.yaml, .yml, .json or .toml)")
    add_plugin_options(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of specs for the installed components")
    p.add_argument("--out", help="write it to this file instead of stdout")
    add_plugin_options(p)
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("train", help="train the pipeline a spec describes and save it to a run directory")
    p.add_argument("spec", help="spec file (.yaml, .yml, .json or .toml)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="override train.device")
    p.add_argument("--compile", action="store_true", default=None, help="train through torch.compile (train.compile)")
    p.add_argument(
        "--force",
        action="store_true",
        help="start over in --out: after checking the spec, device and data, move what it holds aside to the sibling"
        " DIR.old-<time> (nothing is deleted)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest readable checkpoint, exactly where it stopped"
        " (a finished run goes on to a larger --steps)",
    )
    p.add_argument(
        "--allow-spec-change",
        action="store_true",
        help="with --resume, accept a spec that differs from the checkpoint's in settings that may change"
        " (more steps, another lr, ...)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_plugin_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sample",
        help="draw samples from a trained run",
        description="Draw samples from a trained run; with --label, samples of those classes (a conditional"
        " denoiser, or the run's guidance: classifier or classifier-free guidance).",
    )
    p.add_argument("run", help="run directory written by `diffkit train`")
    p.add_argument("--n", type=int, default=1000, help="number of samples, per label with --label (default 1000)")
    p.add_argument("--out", required=True, help="output file: .npy (samples in data coordinates) or .png (picture)")
    p.add_argument("--seed", type=int, help="seed of the sampler's noise (default: random)")
    p.add_argument("--sampler", help="use this registered sampler, with its default parameters, instead of the spec's")
    p.add_argument("--steps", type=int, help="number of reverse steps (default: the sampler's)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="samples drawn at once; memory holds one batch whatever --n (default: as many as make 2^20 values, at"
        " most 10,000)",
    )
    p.add_argument(
        "--label",
        metavar="LABELS",
        help="sample this class (3), or these classes (0,1,2: a picture with one row per label; .npy rows in"
        " label order); needs a conditional denoiser or the run's guidance",
    )
    add_guidance_options(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu", help="where to sample (default cpu)")
    p.add_argument(
        "--noise",
        choices=["per-sample", "batch"],
        default="per-sample",
        help="per-sample (default): a seed fixes each sample whatever --n, --batch-size or --device; batch: one"
        " generator across each batch, as diffkit 0.1 drew it (reproduces a 0.1 run's samples)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="run the network through torch.compile (sample.compile) (compiled once, cached on disk; falls back to uncompiled with a"
        " notice where compiling fails)",
    )
    p.add_argument("--trajectory", metavar="FILE.png", help="also draw the reverse process, noise to data, for a few samples")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_plugin_options(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("forward", help="draw the forward process q(x_t | x_0) on real data at several t")
    p.add_argument("source", help="a run directory or a spec file (its data and schedule are used)")
    p.add_argument("--out", required=True, help="output picture (.png)")
    p.add_argument("--n", type=int, default=8, help="number of data examples (default 8; at most 64 images or 100,000 points)")
    p.add_argument("--frames", type=int, default=8, help="number of timesteps shown, from 0 to T-1 (default 8, at most 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and the noise")
    add_plugin_options(p)
    p.set_defaults(func=cmd_forward)

    import diffkit.commands

    for info in sorted(pkgutil.iter_modules(diffkit.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"diffkit.commands.{info.name}").register(sub)
    for command in sub.choices.values():  # --debug goes before or after the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
        for action in command._actions:
            if action.dest == "seed":  # every command's --seed is a seed torch takes
                action.type = _seed
    return parser


def _seed(text: str) -> int:
    from diffkit.errors import SpecError
    from diffkit.spec import check_seed

    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got '{text}'") from None
    except SpecError as exc:
        raise argparse.ArgumentTypeError(exc.problems[0][1]) from None


def _version() -> str:
    from diffkit import __version__

    return __version__


# -- commands ------------------------------------------------------------------------------
def cmd_plugins(args: argparse.Namespace) -> int:
    registry = load_registry(args)
    if args.check:
        return _check_plugins(registry, as_json=args.json)
    rows = list(registry.rows())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["kind", "name", "plugin", "distribution", "version", "status"]
    table = [[str(r.get(c) if r.get(c) is not None else "-") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) if table else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip())
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    for r in rows:
        if r["status"] == "failed":
            print(f"\nplugin '{r['plugin']}' failed: {r.get('error')}")
    return 0


def _check_plugins(registry: Registry, *, as_json: bool) -> int:
    """``diffkit plugins --check``: every problem on its own line, exit 1 if there is any."""
    from diffkit.plugins import check_plugins

    problems = check_plugins(registry)
    if as_json:
        print(json.dumps({"ok": not problems, "problems": problems}, indent=2))
        return 1 if problems else 0
    for problem in problems:
        print(f"problem: {problem}")
    loaded = sum(p.status == "loaded" for p in registry.plugins)
    components = sum(len(registry.all(kind)) for kind in registry.entries)
    if problems:
        print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} found")
        return 1
    print(f"ok: {loaded} plugins loaded, {components} components, the spec schema builds")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from diffkit.spec import load_spec

    spec = load_spec(args.spec, load_registry(args), check_inputs=True)
    summary = ", ".join(f"{s}: {getattr(spec, s).type}" for s in ("data", "schedule", "denoiser", "objective", "sampler"))
    print(f"{args.spec} is valid ({summary})")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from diffkit.spec import json_schema

    text = json.dumps(json_schema(load_registry(args)), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from diffkit import distributed, rundir
    from diffkit.pipeline import Pipeline

    registry = load_registry(args)
    out = Path(args.out)
    writer = distributed.env_rank() == 0  # under torchrun, rank 0 alone writes
    if args.allow_spec_change and not args.resume:
        raise DiffkitError("--allow-spec-change goes with --resume")
    if writer:  # the other processes of a torchrun job leave --out to rank 0
        rundir.check_train_out(out, force=args.force, resume=args.resume)
    pipe = Pipeline.from_spec(args.spec, registry)
    overrides: dict[str, Any] = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.device is not None:
        overrides["device"] = args.device
    if args.compile:
        overrides["compile"] = True
    overrides = _validated_overrides(overrides)
    if not writer:
        return _train(pipe, out, args, overrides, writer)
    pipe.check_training(**overrides)  # device, logging extras, data: before anything in --out changes
    with rundir.lock(out, say=lambda msg: print(f"diffkit: {msg}", file=sys.stderr)) as held:
        if args.force:
            moved = held.move_aside()
            if moved is not None:
                print(f"diffkit: moved the earlier contents of {out} to {moved}", file=sys.stderr)
        return _train(pipe, out, args, overrides, writer)


def _train(pipe: Any, out: Path, args: argparse.Namespace, overrides: dict[str, Any], writer: bool) -> int:
    from diffkit import distributed, plotting
    from diffkit.pipeline import CHECKPOINTS_DIR, METRICS_FILE

    try:
        result = pipe.fit(
            out=out,
            progress=not args.no_progress,
            resume=args.resume,
            allow_spec_change=args.allow_spec_change,
            **overrides,
        )
        if not writer:
            return 0
        pipe.save(out)
        written = ["spec.yaml", "denoiser.safetensors", "meta.json", METRICS_FILE, f"{CHECKPOINTS_DIR}/"]
        if result.history:
            plotting.loss_curve(result.history, out / "loss.png")
            written.append("loss.png")
        if pipe.train_config.preview > 0:
            _preview(pipe, out / "samples.png", pipe.train_config.preview, progress=not args.no_progress)
            written.append("samples.png")
    finally:
        distributed.shutdown()
    ran = result.steps - (result.resumed_from or 0)
    rate = ran / result.seconds if result.seconds > 0 else float("inf")
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from is not None else ""
    print(
        f"trained {result.steps} steps in {result.seconds:.1f} s ({rate:.1f} steps/s{resumed}), final loss"
        f" {result.final_loss:.4f}, effective batch size {result.effective_batch_size}\n"
        f"wrote {out}/{{{', '.join(written)}}}"
    )
    return 0


def _validated_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    from pydantic import ValidationError

    from diffkit.spec import TrainConfig

    try:
        TrainConfig.model_validate(overrides)
    except ValidationError as err:
        e = err.errors()[0]
        raise DiffkitError(f"--{e['loc'][0]}: {e['msg']}") from None
    return overrides


def _preview(pipe: Any, path: Path, n: int, progress: bool) -> None:
    samples = pipe.sample(n, seed=pipe.seed, progress=progress)
    _write_picture(pipe, samples, path)


def _write_picture(pipe: Any, samples: Any, path: Path) -> None:
    pipe.picture(samples, path)


def add_guidance_options(p: argparse.ArgumentParser) -> None:
    """--guidance-scale, --guidance-interval and --guidance-rescale: the run's guidance, changed for this call."""
    p.add_argument(
        "--guidance-scale",
        type=float,
        metavar="S",
        help="scale of the run's guidance (default: its spec's); 0 samples without guidance",
    )
    p.add_argument(
        "--guidance-interval",
        metavar="LO,HI",
        help="guide only where the noise level lies in [LO, HI], in the units of the guidance's interval_in"
        " (σ̃ = σ/α by default; Kynkäänniemi et al. 2024); default: its spec's",
    )
    p.add_argument(
        "--guidance-rescale",
        type=float,
        metavar="PHI",
        help="φ in [0, 1] of rescaled guidance (Lin et al. 2024): 1 keeps the guided prediction's standard deviation"
        " at the unguided one's; default: its spec's",
    )


def guidance_options(args: argparse.Namespace) -> dict[str, Any]:
    """The guidance options asked for on the command line, checked (``None`` where not given)."""
    from diffkit.guidance import check_guidance_scale, parse_interval

    check_guidance_scale(args.guidance_scale)
    interval = None
    if args.guidance_interval is not None:
        try:
            interval = parse_interval(args.guidance_interval)
        except ValueError as exc:
            raise DiffkitError(f"--guidance-interval: {exc}") from None
    if args.guidance_rescale is not None and not 0 <= args.guidance_rescale <= 1:
        raise DiffkitError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    return {"scale": args.guidance_scale, "interval": interval, "rescale_phi": args.guidance_rescale}


def check_guidance_asked(pipe: Any, options: dict[str, Any], labelled: bool, how: str = "--label") -> None:
    """One clear error for guidance options a run cannot use without labels."""
    asked = [k for k, v in options.items() if v is not None]
    if not asked:
        return
    if pipe.guidance is None:
        raise DiffkitError(
            "this run has no guidance to change (--guidance-*); sample without those options, or train with a"
            " guidance section in the spec"
        )
    if getattr(pipe.guidance, "needs_labels", True) and not labelled:
        raise DiffkitError(f"--guidance-* needs {how}: the run's guidance steers toward the labels asked for")


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from diffkit import plotting
    from diffkit.pipeline import Pipeline, write_npy

    out = Path(args.out)
    if args.trajectory:
        _check_png(args.trajectory, "--trajectory")
    if out.suffix.lower() not in SAMPLE_FORMATS:
        raise DiffkitError(f"--out must end in {' or '.join(SAMPLE_FORMATS)}, got '{out.name}'")
    if args.n < 1:
        raise DiffkitError(f"--n must be at least 1, got {args.n}")
    if args.batch_size is not None and args.batch_size < 1:
        raise DiffkitError(f"--batch-size must be at least 1, got {args.batch_size}")
    classes = _parse_labels(args.label) if args.label is not None else None
    options = guidance_options(args)
    registry = load_registry(args)
    pipe = Pipeline.load(args.run, registry, device=args.device)
    check_guidance_asked(pipe, options, classes is not None)
    guidance = {
        "guidance_scale": options["scale"],
        "guidance_interval": options["interval"],
        "guidance_rescale": options["rescale_phi"],
    }
    if classes is not None:
        _check_labels(pipe, classes, args)
    total = args.n * (len(classes) if classes else 1)
    if out.suffix.lower() == ".png":
        pipe.check_picture(total)
    start = time.perf_counter()
    # label by label (rows in label order), each from --seed, each batch by batch
    batches = [
        pipe.sample_batches(
            args.n,
            seed=args.seed,
            sampler=args.sampler,
            steps=args.steps,
            labels=label,
            **guidance,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            noise=args.noise,
            compile=args.compile,
        )
        for label in (classes or [None])
    ]
    if out.suffix.lower() == ".npy":
        write_npy(out, (x for chunks in batches for x in chunks), total, pipe.context.sample_shape)
    else:
        samples = torch.cat([x for chunks in batches for x in chunks])
    seconds = time.perf_counter() - start
    clipped = pipe.last_clipped
    if clipped:
        print(
            f"diffkit: the bound on x̂_0 was hit: {clipped:.2%} of the predicted x̂_0 values were clipped to it"
            " (sampler.clip_denoised; null turns it off)",
            file=sys.stderr,
        )
    if args.trajectory:
        _check_png(args.trajectory, "--trajectory")
        # images: a few rows to look at; points: enough of them to see the shape form
        shown = min(total, 8) if pipe.context.data_kind == "images" else min(total, 2000)
        where = torch.linspace(0, total - 1, shown).round().long()
        picked = None if classes is None else torch.tensor(classes)[where // args.n]
        ts, states = pipe.trajectory(
            n=shown, seed=args.seed, sampler=args.sampler, steps=args.steps, labels=picked, **guidance
        )
        names = [f"t = {t}" if t >= 0 else "x₀" for t in ts]
        plotting.frames(states, names, args.trajectory, title="reverse process: noise → data")
    if out.suffix.lower() == ".png" and classes is None:
        _write_picture(pipe, samples, out)
    elif out.suffix.lower() == ".png":
        _write_labelled_picture(pipe, samples, classes, args.n, out)
    if classes is None:
        what = f"{args.n} samples"
    elif len(classes) == 1:
        what = f"{args.n} samples of label {classes[0]}"
    else:
        what = f"{args.n} samples of each of the labels {','.join(map(str, classes))}"
    print(f"drew {what} of shape {tuple(pipe.context.sample_shape)} in {seconds:.1f} s; wrote {out}")
    return 0


def _parse_labels(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    try:
        labels = [int(p) for p in parts]
    except ValueError:
        raise DiffkitError(f"--label takes class numbers separated by commas (3, or 0,1,2), got '{text}'") from None
    if any(label < 0 for label in labels):
        raise DiffkitError(f"--label takes class numbers from 0, got '{text}'")
    return labels


def _check_labels(pipe: Any, labels: list[int], args: argparse.Namespace) -> None:
    """One clear error for labels a run cannot sample (before any sampling starts)."""
    classes = pipe.context.num_classes
    if not classes:
        raise DiffkitError(f"{args.run} was trained on data without labels, so it cannot sample by --label")
    bad = [label for label in labels if label >= classes]
    if bad:
        raise DiffkitError(f"--label {bad[0]} is out of range: {args.run} has {classes} classes, 0 to {classes - 1}")


def _write_labelled_picture(pipe: Any, samples: Any, labels: list[int], per_label: int, path: Path) -> None:
    """Images: a grid with one row per label. Points: a scatter with one colour per label,
    beside the data coloured by its labels."""
    from diffkit import plotting

    if pipe.context.data_kind == "images":
        plotting.image_grid(samples, path, nrow=per_label if len(labels) > 1 else None)
        return
    import matplotlib.pyplot as plt

    reference = pipe.reference_data()  # saved in the run: sampling reads no data
    panels = ([("data", reference[0][:5000], reference[1][:5000])] if reference is not None else []) + [
        ("samples", samples, _repeat_labels(labels, per_label))
    ]
    cmap = plt.get_cmap("tab10" if pipe.context.num_classes <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False, sharex=True, sharey=True)
    for ax, (name, pts, ys) in zip(axes[0], panels):
        pts = pts.reshape(pts.shape[0], -1).cpu().numpy()
        colours = cmap(ys.cpu().numpy() % cmap.N)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.6, c=colours, linewidths=0)
        ax.set_title(f"{name} (n = {len(pts):,})")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{pipe.spec.data.type}: samples of labels {', '.join(map(str, labels))}")
    plotting._save(fig, path)


def _repeat_labels(labels: list[int], per_label: int) -> Any:
    import torch

    return torch.tensor(labels).repeat_interleave(per_label)


def _check_png(path: str | Path, flag: str) -> None:
    if Path(path).suffix.lower() != ".png":
        raise DiffkitError(f"{flag} must name a .png file, got '{Path(path).name}'")


def cmd_forward(args: argparse.Namespace) -> int:
    import torch

    from diffkit import plotting
    from diffkit.pipeline import Pipeline

    _check_png(args.out, "--out")
    if args.n < 1 or args.frames < 2:
        raise DiffkitError("--n must be at least 1 and --frames at least 2")
    registry = load_registry(args)
    source = Path(args.source)
    pipe = Pipeline.load(source, registry) if source.is_dir() else Pipeline.from_spec(source, registry)
    pipe.check_forward(args.n, args.frames)
    # a run keeps examples of its data, so drawing from it reads no data (only older runs, saved without, do)
    kept = pipe.reference_data() if source.is_dir() else None
    data = pipe.dataset if kept is None else None
    size = len(kept[0]) if kept is not None else len(data)
    g = torch.Generator().manual_seed(args.seed)
    if pipe.context.data_kind == "points":
        n = min(max(args.n, 2000), size)  # a scatter needs many points
    else:
        n = min(args.n, size)
    idx = torch.randperm(size, generator=g)[:n].tolist()
    x0 = kept[0][idx] if kept is not None else torch.stack([data[i][0] for i in idx])
    T = pipe.schedule.T
    ts = sorted({round(v) for v in torch.linspace(0, T - 1, args.frames).tolist()})
    states = pipe.forward_process(x0, ts, seed=args.seed)
    labels = [f"t = {t}" for t in ts]
    plotting.frames(states, labels, args.out, title="forward process q(x_t | x_0)")
    print(f"wrote {args.out} ({len(ts)} timesteps of {n} examples)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("diffkit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        print(f"diffkit: error: {error_message(exc)}", file=sys.stderr)
        return 1


def error_message(exc: BaseException) -> str:
    """What the command line prints for an exception that ended a command: a
    :class:`DiffkitError`'s own message, else one line saying what failed (``--debug``
    shows the traceback)."""
    if isinstance(exc, DiffkitError):
        return str(exc)
    if _out_of_memory(exc):
        return (
            "out of memory; pass a smaller --batch-size (or train.batch_size in the spec), or use a smaller"
            " network"
        )
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text (byte {exc.start}: {exc.reason}); rerun with --debug to see which"
    if isinstance(exc, RecursionError):
        return "an input is nested too deeply to read; rerun with --debug to see which"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return f"{exc.strerror or exc}{where}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    unexpected = "an unexpected failure; rerun with --debug for the traceback"
    return f"{type(exc).__name__}: {first or 'no message'} ({unexpected})"


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, (MemoryError, oom)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
