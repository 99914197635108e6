"""The Pipeline: a schedule, a denoiser, an objective and a sampler composed over data.

Built from a spec (``Pipeline.from_spec``) or in Python (``Pipeline(...)``), and in
both cases able to write its spec back out (``pipe.spec``): the two are faces of one
thing. ``fit`` trains, ``sample`` draws, ``save``/``load`` round-trip through a run
directory of YAML, JSON and safetensors.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor, nn

import diffkit
from diffkit import checkpoint
from diffkit.errors import DiffkitError
from diffkit.interfaces import BuildContext, Dataset, Objective, Predict, Sampler, Schedule, StepCallback
from diffkit.plugins import get_registry
from diffkit.registry import Registry
from diffkit.spec import SECTIONS, Spec, TrainConfig, dump_spec, load_spec, validate_spec
from diffkit.train import EMA, TrainResult, resolve_device, train

__all__ = ["Pipeline"]

Config = str | Mapping[str, Any] | BaseModel

SPEC_FILE = "spec.yaml"
WEIGHTS_FILE = "denoiser.safetensors"
META_FILE = "meta.json"


def _as_config(value: Config) -> dict[str, Any]:
    if isinstance(value, str):
        return {"type": value}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return dict(value)


class Pipeline:
    """A diffusion model ready to train and sample.

    Each component may be given as a name (``"cosine"``), a spec section
    (``{"type": "cosine", "timesteps": 500}``) or an object already built (by
    ``diffkit.build`` or by hand). ``data`` is a spec section or a Dataset;
    ``shape`` stands in for data when there is none (a pipeline that only samples).
    """

    def __init__(
        self,
        schedule: Config | Schedule = "linear",
        denoiser: Config | nn.Module = "mlp",
        objective: Config | Objective = "epsilon",
        sampler: Config | Sampler = "ddpm",
        *,
        data: Config | Dataset | None = None,
        shape: tuple[int, ...] | None = None,
        train: Mapping[str, Any] | TrainConfig | None = None,
        seed: int = 0,
        registry: Registry | None = None,
        _context: BuildContext | None = None,
    ) -> None:
        self.registry = registry or get_registry()
        self.seed = seed
        self.train_config = train if isinstance(train, TrainConfig) else TrainConfig.model_validate(train or {})
        self._dataset: Dataset | None = None
        self._data_config: dict[str, Any] | None = None
        if isinstance(data, Dataset):
            self._dataset = data
        elif data is not None:
            self._data_config = _as_config(data)
        self.context = _context or self._infer_context(shape)
        self.schedule: Schedule = self._build("schedule", schedule)
        self.denoiser: nn.Module = self._build("denoiser", denoiser)
        self.objective: Objective = self._build("objective", objective)
        self.sampler: Sampler = self._build("sampler", sampler)
        # Standardisation of point data, fitted on the training set (None for images).
        self.data_mean: Tensor | None = None
        self.data_std: Tensor | None = None
        self._online: nn.Module | None = None  # the raw trained weights; self.denoiser holds their EMA
        self.steps_trained = 0

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: str | Path | Mapping[str, Any] | Spec, registry: Registry | None = None) -> Pipeline:
        """Build a pipeline from a spec file (YAML, JSON, TOML), a dict, or a Spec."""
        registry = registry or get_registry()
        return cls._from_validated(load_spec(spec, registry), registry)

    @classmethod
    def _from_validated(cls, spec: Spec, registry: Registry, context: BuildContext | None = None) -> Pipeline:
        return cls(
            **{section: getattr(spec, section) for section in SECTIONS if section != "data"},
            data=spec.data,
            train=spec.train,
            seed=spec.seed,
            registry=registry,
            _context=context,
        )

    def _infer_context(self, shape: tuple[int, ...] | None) -> BuildContext:
        if shape is not None:
            return BuildContext(sample_shape=tuple(shape), seed=self.seed)
        if self._dataset is None and self._data_config is None:
            raise DiffkitError("the pipeline needs data (data=...) or the shape of one sample (shape=...)")
        ds = self.dataset
        return BuildContext(
            sample_shape=tuple(ds.sample_shape), num_classes=ds.num_classes, seed=self.seed, data_kind=ds.kind
        )

    def _build(self, kind: str, value: Any) -> Any:
        if isinstance(value, (str, Mapping, BaseModel)):
            return self.registry.build(kind, value, self.context)
        return value

    @property
    def dataset(self) -> Dataset:
        """The training data, built from the spec on first use."""
        if self._dataset is None:
            if self._data_config is None:
                raise DiffkitError("this pipeline has no data; pass data=... to Pipeline or to fit()")
            ctx = BuildContext(seed=self.seed)
            self._dataset = self.registry.build("data", self._data_config, ctx)
        return self._dataset

    @property
    def spec(self) -> Spec:
        """The spec of this pipeline; ``Pipeline.from_spec(pipe.spec)`` builds an equivalent one."""
        body: dict[str, Any] = {"seed": self.seed, "train": self.train_config.model_dump(mode="json")}
        if self._data_config is None:
            raise DiffkitError(
                "this pipeline's data was given as an object, not a spec section, so it has no spec;"
                " pass data={'type': ...} to write one"
            )
        body["data"] = self._data_config
        for section in SECTIONS:
            if section == "data":
                continue
            obj = getattr(self, section)
            section_spec = getattr(obj, "__diffkit_spec__", None)
            if section_spec is None:
                raise DiffkitError(
                    f"the {section} ({type(obj).__name__}) was built by hand, not from the registry, so the"
                    f" pipeline has no spec; build it with diffkit.build('{SECTIONS[section]}', ...) instead"
                )
            body[section] = section_spec
        return validate_spec(body, self.registry)

    # -- training ----------------------------------------------------------------------
    def fit(
        self,
        data: Dataset | None = None,
        *,
        out: str | Path | None = None,
        progress: bool = True,
        **overrides: Any,
    ) -> TrainResult:
        """Train per ``self.train_config``; keyword overrides (``steps=100``) apply to this call.

        With ``out``, the metrics are appended to ``out/metrics.jsonl``.
        """
        config = TrainConfig.model_validate({**self.train_config.model_dump(), **overrides})
        dataset = data if data is not None else self.dataset
        if tuple(dataset.sample_shape) != self.context.sample_shape:
            raise DiffkitError(
                f"the data's samples have shape {tuple(dataset.sample_shape)} but the pipeline was built for"
                f" {self.context.sample_shape}"
            )
        device = resolve_device(config.device)
        self._fit_normalizer(dataset)
        classes = getattr(self.denoiser, "num_classes", None)
        if classes and not dataset.num_classes:
            raise DiffkitError(
                f"the denoiser is conditional (num_classes = {classes}) but the data has no labels;"
                " remove denoiser.num_classes or use labelled data"
            )
        if classes and dataset.num_classes > classes:
            raise DiffkitError(
                f"the data has {dataset.num_classes} classes but denoiser.num_classes is {classes}; set it to"
                f" {dataset.num_classes}"
            )
        online = self._online if self._online is not None else copy.deepcopy(self.denoiser)
        online.to(device)
        self.denoiser.to(device)
        ema = EMA(online, config.ema_decay, target=self.denoiser)
        ema.updates = self.steps_trained
        metrics = None
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            metrics = Path(out) / "metrics.jsonl"
        result = train(
            online,
            ema,
            self.objective,
            self.schedule,
            dataset,
            config,
            seed=self.seed + self.steps_trained,
            device=device,
            transform=self._normalize if self.data_mean is not None else None,
            conditional=bool(classes),
            metrics_path=metrics,
            progress=progress,
            start_step=self.steps_trained,
        )
        self._online = online
        self.steps_trained += result.steps
        self.denoiser.eval()
        return result

    def _fit_normalizer(self, dataset: Dataset) -> None:
        """Standardise point data per coordinate, once, from the training set."""
        if dataset.kind != "points" or self.data_mean is not None:
            return
        tensors = dataset.tensors()
        if tensors is None:
            raise DiffkitError("point data must live in memory (Dataset.tensors()) to be standardised")
        x = tensors[0].double()
        self.data_mean = x.mean(0).float()
        self.data_std = x.std(0).clamp_min(1e-8).float()

    def _normalize(self, x: Tensor) -> Tensor:
        assert self.data_mean is not None and self.data_std is not None
        return (x - self.data_mean.to(x.device)) / self.data_std.to(x.device)

    def denormalize(self, x: Tensor) -> Tensor:
        """Map model-space values back to the data's own coordinates."""
        if self.data_mean is None or self.data_std is None:
            return x
        return x * self.data_std.to(x.device) + self.data_mean.to(x.device)

    # -- sampling ----------------------------------------------------------------------
    def predictor(self, cond: Tensor | None = None) -> Predict:
        """``predict(x_t, t) -> ε̂`` from the (EMA) denoiser through the objective's conversion."""
        net, objective, schedule = self.denoiser, self.objective, self.schedule

        def predict(x_t: Tensor, t: Tensor) -> Tensor:
            return objective.to_eps(net(x_t, t, cond), x_t, t, schedule)

        return predict

    @property
    def device(self) -> torch.device:
        p = next(self.denoiser.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def sample(
        self,
        n: int,
        seed: int | None = None,
        sampler: Config | Sampler | None = None,
        steps: int | None = None,
        *,
        batch_size: int | None = None,
        progress: bool = False,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """Draw ``n`` samples in the data's own coordinates (standardisation undone).

        ``sampler`` overrides the pipeline's (a name, a section or an object); ``steps``
        asks for fewer reverse steps; ``batch_size`` bounds memory by sampling in
        chunks. The same ``seed`` and ``batch_size`` give the same samples.
        ``callback(t, x_t)`` sees every state of every chunk, in model space.
        """
        if n < 1:
            raise DiffkitError(f"the number of samples must be at least 1, got {n}")
        if steps is not None and not 1 <= steps <= self.schedule.T:
            raise DiffkitError(f"steps must be between 1 and the schedule's T = {self.schedule.T}, got {steps}")
        chosen = self.sampler if sampler is None else self._build("sampler", sampler)
        device = self.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed) if seed is not None else generator.seed()
        predict = self.predictor()
        batch_size = batch_size or n
        chunks = []
        self.denoiser.eval()
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                m = min(batch_size, n - start)
                x = chosen(
                    predict,
                    self.schedule,
                    (m, *self.context.sample_shape),
                    generator=generator,
                    steps=steps,
                    device=device,
                    progress=progress,
                    callback=callback,
                )
                chunks.append(self.denormalize(x).cpu())
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def trajectory(
        self,
        n: int = 8,
        frames: int = 8,
        seed: int | None = None,
        sampler: Config | Sampler | None = None,
        steps: int | None = None,
    ) -> tuple[list[int], Tensor]:
        """The reverse process from noise to data: ``frames`` evenly spaced states of
        ``n`` samples, as ``(timesteps, states [frames, n, ...])`` in data coordinates
        (timestep −1 is the final sample)."""
        seen: list[tuple[int, Tensor]] = []
        self.sample(n, seed=seed, sampler=sampler, steps=steps, callback=lambda t, x: seen.append((t, x.clone())))
        picks = torch.linspace(0, len(seen) - 1, min(frames, len(seen))).round().long().tolist()
        return [seen[i][0] for i in picks], torch.stack([self.denormalize(seen[i][1]).cpu() for i in picks])

    def forward_process(self, x0: Tensor, timesteps: list[int], seed: int = 0) -> Tensor:
        """Draws of q(x_t | x_0) for each of ``timesteps`` from data ``x0`` (in data
        coordinates), as ``[len(timesteps), N, ...]`` in data coordinates."""
        g = torch.Generator().manual_seed(seed)
        if self.context.data_kind == "points" and self.data_mean is None:
            self._fit_normalizer(self.dataset)
        z = self._normalize(x0) if self.data_mean is not None else x0
        noise = torch.randn(z.shape, generator=g)
        out = [self.schedule.q_sample(z, torch.full((z.shape[0],), t, dtype=torch.long), noise) for t in timesteps]
        return torch.stack([self.denormalize(x) for x in out])

    # -- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the spec (YAML), the EMA weights and statistics (safetensors) and metadata (JSON)."""
        directory = Path(directory)
        spec = self.spec
        tensors = {f"denoiser.{k}": v for k, v in self.denoiser.state_dict().items()}
        if self._online is not None:
            tensors.update({f"online.{k}": v for k, v in self._online.state_dict().items()})
        if self.data_mean is not None and self.data_std is not None:
            tensors["data.mean"], tensors["data.std"] = self.data_mean, self.data_std
        directory.mkdir(parents=True, exist_ok=True)
        checkpoint.save_tensors(directory / WEIGHTS_FILE, tensors, metadata={"format": "diffkit-pipeline-1"})
        checkpoint.write_json(
            directory / META_FILE,
            {
                "format": 1,
                "diffkit_version": diffkit.__version__,
                "sample_shape": list(self.context.sample_shape),
                "num_classes": self.context.num_classes,
                "data_kind": self.context.data_kind,
                "steps_trained": self.steps_trained,
                "components": {
                    section: {"plugin": e.plugin, "distribution": e.distribution, "version": e.version}
                    for section, kind in SECTIONS.items()
                    for e in [self.registry.get(kind, getattr(spec, section).type)]
                },
            },
        )
        # The spec goes last: a directory with a spec.yaml is a complete run.
        checkpoint.write_text(directory / SPEC_FILE, dump_spec(spec))
        return directory

    @classmethod
    def load(cls, directory: str | Path, registry: Registry | None = None, device: str | None = None) -> Pipeline:
        """Load a pipeline written by :meth:`save` (or by ``diffkit train``)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise DiffkitError(f"{directory} is not a directory; give the run directory that `diffkit train --out` wrote")
        if not (directory / SPEC_FILE).is_file():
            raise DiffkitError(f"{directory} has no {SPEC_FILE}; it is not a finished diffkit run")
        registry = registry or get_registry()
        meta = checkpoint.read_json(directory / META_FILE)
        spec = load_spec(directory / SPEC_FILE, registry)
        context = BuildContext(
            sample_shape=tuple(meta["sample_shape"]),
            num_classes=meta.get("num_classes"),
            seed=spec.seed,
            data_kind=meta.get("data_kind", "points"),
        )
        pipe = cls._from_validated(spec, registry, context)
        tensors = checkpoint.load_tensors(directory / WEIGHTS_FILE)
        pipe._load_state(tensors, directory)
        pipe.steps_trained = int(meta.get("steps_trained", 0))
        if device is not None:
            pipe.to(device)
        return pipe

    def _load_state(self, tensors: dict[str, Tensor], directory: Path) -> None:
        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        try:
            self.denoiser.load_state_dict(part("denoiser."))
            online = part("online.")
            if online:
                self._online = copy.deepcopy(self.denoiser)
                self._online.load_state_dict(online)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise DiffkitError(
                f"the weights in {directory / WEIGHTS_FILE} do not fit the denoiser its spec describes ({first})"
            ) from None
        self.data_mean, self.data_std = tensors.get("data.mean"), tensors.get("data.std")
        self.denoiser.eval()

    def to(self, device: str | torch.device) -> Pipeline:
        device = resolve_device(device)
        self.denoiser.to(device)
        if self._online is not None:
            self._online.to(device)
        return self

    def __repr__(self) -> str:
        params = sum(p.numel() for p in self.denoiser.parameters())
        return (
            f"Pipeline({self.schedule!r}, denoiser={type(self.denoiser).__name__} ({params:,} parameters),"
            f" objective={type(self.objective).__name__}, sampler={type(self.sampler).__name__},"
            f" sample_shape={self.context.sample_shape}, steps_trained={self.steps_trained})"
        )
