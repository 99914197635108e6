"""``diffkit evaluate RUN``: the variational bound on held-out data, in bits per dimension, or
(``--method ode``) the exact negative log-likelihood from the probability-flow ODE."""

from __future__ import annotations

import argparse
import json
from typing import Any

from diffkit.errors import DiffkitError

FRESH_POINTS = 2000  # size of a fresh draw of point data when --n is not given


def register(sub: argparse._SubParsersAction) -> None:
    from diffkit.cli import add_plugin_options

    p = sub.add_parser(
        "evaluate",
        help="the variational bound (negative log-likelihood) of a trained run on held-out data, in bits/dim",
        description=(
            "Report the variational bound L_T + Σ L_{t−1} + L_0 on −log p(x) (Ho et al. 2020, Eq. 5) in bits per"
            " dimension, with its terms. Images use the discretised Gaussian decoder; point data a Gaussian"
            " density, reported in the data's own coordinates (the Jacobian of the standardisation included)."
            " By default the data is the run's held-out data: the test split where the dataset has one,"
            f" otherwise a fresh draw ({FRESH_POINTS} points unless --n) with the next seed."
            " With --method ode, report instead the exact negative log-likelihood from the probability-flow"
            " ODE (instantaneous change of variables, Chen et al. 2018; Song et al. 2021, App. D.2): nats per"
            " example for points, bits/dim for images (uniformly dequantised)."
        ),
    )
    p.add_argument("run", help="run directory written by `diffkit train`")
    p.add_argument(
        "--data",
        metavar="SECTION",
        help="evaluate on this data instead: a data section as JSON ('{\"type\": \"moons\", \"seed\": 7}') or a name",
    )
    p.add_argument("--n", type=int, help="use at most N examples (a random subset; for a fresh draw, its size)")
    p.add_argument(
        "--timesteps", type=int, help="estimate Σ L_{t−1} from this many stratified timesteps per example (default: all T−1)"
    )
    p.add_argument(
        "--variance",
        choices=["beta", "posterior"],
        default="beta",
        help="variance σ_t² of the reverse steps: β_t (default) or the posterior's β̃_t (Ho et al. 2020, Sec. 3.2)",
    )
    p.add_argument(
        "--method",
        choices=["elbo", "ode"],
        default="elbo",
        help="elbo: the variational bound (default); ode: the exact likelihood from the probability-flow ODE",
    )
    p.add_argument("--rtol", type=float, default=1e-5, help="--method ode: the solver's relative tolerance (default 1e-5)")
    p.add_argument("--atol", type=float, default=1e-5, help="--method ode: the solver's absolute tolerance (default 1e-5)")
    p.add_argument(
        "--divergence",
        choices=["auto", "exact", "hutchinson"],
        default="auto",
        help="--method ode: the divergence exactly (autograd, one pass per dimension) or by Hutchinson's"
        " estimator; auto: exact up to 64 dimensions",
    )
    p.add_argument(
        "--hutchinson-samples", type=int, default=1, help="--method ode: Rademacher probes per example (default 1)"
    )
    p.add_argument("--levels", type=int, help="grey levels of image data for the discretised decoder (default: detected, else 256)")
    p.add_argument("--batch-size", type=int, default=512, help="examples per network call (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws and of the subset (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu", help="where to run (default cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_plugin_options(p)
    p.set_defaults(func=cmd_evaluate)


def held_out_section(section: dict[str, Any], params_model: Any, spec_seed: int, n: int | None) -> tuple[dict[str, Any], str]:
    """The run's data section turned into held-out data, and a description of how.

    The test split (a ``split`` parameter that accepts ``"test"``, or ``train: false``)
    where there is one; otherwise, for generated data with a ``seed``, a draw with the
    next seed. Anything else has no known held-out part.
    """
    from pydantic import ValidationError

    body = {k: v for k, v in section.items() if k != "type"}
    fields = params_model.model_fields

    def valid(changes: dict[str, Any]) -> bool:
        try:
            params_model.model_validate({**body, **changes})
        except ValidationError:
            return False
        return True

    if "split" in fields and valid({"split": "test"}):
        return {**section, "split": "test"}, "its test split"
    if "train" in fields and valid({"train": False}):
        return {**section, "train": False}, "its test set"
    if "seed" in fields:
        seed = (body.get("seed") if body.get("seed") is not None else spec_seed) + 1
        out = {**section, "seed": seed}
        if "n" in fields:
            out["n"] = n or min(body.get("n") or FRESH_POINTS, FRESH_POINTS)
        return out, f"a fresh draw with seed {seed}"
    raise DiffkitError(
        f"the data '{section.get('type')}' has no test split and no seed to draw fresh data with;"
        " give held-out data with --data"
    )


def _parse_data(text: str) -> dict[str, Any]:
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DiffkitError(f"--data is not valid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(value, dict):
            raise DiffkitError("--data must be a JSON object (a data section) or a dataset name")
        return value
    return {"type": text}


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from diffkit.cli import load_registry
    from diffkit.interfaces import BuildContext
    from diffkit.likelihood import variational_bound
    from diffkit.pipeline import Pipeline

    for flag, value in (
        ("--n", args.n),
        ("--timesteps", args.timesteps),
        ("--batch-size", args.batch_size),
        ("--levels", args.levels),
        ("--hutchinson-samples", args.hutchinson_samples),
    ):
        if value is not None and value < (2 if flag == "--levels" else 1):
            raise DiffkitError(f"{flag} must be at least {2 if flag == '--levels' else 1}, got {value}")
    for flag, tol in (("--rtol", args.rtol), ("--atol", args.atol)):
        if not tol > 0:
            raise DiffkitError(f"{flag} must be positive, got {tol}")
    registry = load_registry(args)
    pipe = Pipeline.load(args.run, registry, device=args.device)
    spec = pipe.spec
    if args.data is not None:
        section, how = _parse_data(args.data), "given with --data"
    else:
        run_section = spec.data.model_dump(mode="json")
        entry = registry.get("data", run_section["type"])
        section, how = held_out_section(run_section, entry.component.params, spec.seed, args.n)
    if args.data is not None:
        dataset = registry.build("data", section, BuildContext(seed=spec.seed))
    else:  # the run's own data: read where it lies, never downloaded
        dataset = pipe.build_data(section)
    section = getattr(dataset, "__diffkit_spec__", section)
    tensors = dataset.tensors()
    x = tensors[0] if tensors is not None else torch.stack([dataset[i][0] for i in range(len(dataset))])
    if tuple(x.shape[1:]) != tuple(pipe.context.sample_shape):
        raise DiffkitError(
            f"the data's samples have shape {tuple(x.shape[1:])} but the run's model was trained on"
            f" {tuple(pipe.context.sample_shape)}; choose data of the same shape"
        )
    if args.n is not None and args.n < x.shape[0]:
        g = torch.Generator().manual_seed(args.seed)
        x = x[torch.randperm(x.shape[0], generator=g)[: args.n]]
    if args.method == "ode":
        return _print_ode(args, pipe, x, section, how)
    result = variational_bound(
        pipe,
        x,
        timesteps=args.timesteps,
        batch_size=args.batch_size,
        seed=args.seed,
        levels=args.levels,
        variance=args.variance,
        progress=not args.no_progress,
    )
    result.pop("nats")
    result.update(run=str(args.run), data=section, held_out=how)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    terms = result["terms"]
    decoder = (
        f"discretised Gaussian decoder on {result['levels']} levels"
        if result["decoder"] == "discretized"
        else "Gaussian decoder"
    )
    per = "all" if result["timesteps"] == result["T"] - 1 else "stratified"
    print(f"variational bound of {args.run} on {result['n']} examples of {json.dumps(section)} ({how})")
    print(
        f"T = {result['T']}, {per} {result['timesteps']} timesteps per example, σ_t² = "
        f"{'β_t' if result['variance'] == 'beta' else 'β̃_t'}, {decoder}, {result['coordinates']}"
    )
    print(f"  bits/dim   {result['bpd']:9.4f} ± {result['bpd_se']:.4f}")
    print(f"  L_T        {terms['L_T']:9.4f}")
    print(f"  Σ L_t−1    {terms['L_sum']:9.4f}")
    print(f"  L_0        {terms['L_0']:9.4f}")
    if "jacobian" in terms:
        print(f"  jacobian   {terms['jacobian']:9.4f}   (Σ log s of the standardisation z = (x − m)/s)")
    return 0


def _print_ode(args: argparse.Namespace, pipe: Any, x: Any, section: dict[str, Any], how: str) -> int:
    from diffkit.likelihood import pipeline_ode_likelihood

    exact = {"auto": None, "exact": True, "hutchinson": False}[args.divergence]
    result = pipeline_ode_likelihood(
        pipe,
        x,
        batch_size=args.batch_size,
        seed=args.seed,
        levels=args.levels,
        exact_divergence=exact,
        hutchinson_samples=args.hutchinson_samples,
        rtol=args.rtol,
        atol=args.atol,
        progress=not args.no_progress,
    )
    result.pop("nats")
    result.update(method="ode", run=str(args.run), data=section, held_out=how)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"exact likelihood (probability-flow ODE) of {args.run} on {result['n']} examples of {json.dumps(section)} ({how})")
    print(
        f"t from {result['t_min']:g} to {result['t_max']:g}, dopri5 at rtol {result['rtol']:g}, atol {result['atol']:g},"
        f" {result['divergence']} divergence, {result['nfe']:.0f} evaluations per batch, {result['coordinates']}"
    )
    unit = "nats" if result["unit"] == "nats" else "bits/dim"
    print(f"  NLL ({unit})  {result['nll']:9.4f} ± {result['nll_se']:.4f}")
    if result["unit"] == "nats":
        print(f"  bits/dim     {result['bpd']:9.4f}")
    return 0
