"""The Pipeline: a schedule, a denoiser, an objective and a sampler composed over data.

Built from a spec (``Pipeline.from_spec``) or in Python (``Pipeline(...)``), and in
both cases able to write its spec back out (``pipe.spec``): the two are faces of one
thing. ``fit`` trains, ``sample`` draws (by label, with guidance, where the pipeline can),
``save``/``load`` round-trip through a run directory of YAML, JSON and safetensors.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor, nn

import diffkit
from diffkit import checkpoint, distributed, memory, rundir
from diffkit import diffusion as D
from diffkit.checkpoint import CheckpointDir, TrainingCheckpoint
from diffkit.compiled import CompiledNetwork
from diffkit.distributed import DistContext
from diffkit.errors import DiffkitError, PluginError, SpecError
from diffkit.guidance import GuidanceMethod, GuidedModel, check_guidance_scale, guide
from diffkit.interfaces import (
    BuildContext,
    CondPredict,
    Dataset,
    Objective,
    Predict,
    Sampler,
    Schedule,
    StepCallback,
    network_output,
)
from diffkit.noise import NoiseMode, SampleNoise, fresh_seed
from diffkit.plugins import get_registry
from diffkit.process import Process
from diffkit.registry import Entry, Registry, loop_sampler_problem
from diffkit.requirements import check_requirements
from diffkit.sampling import Denoised, DenoiseFn, denoise_from_eps, is_step_sampler, table_time
from diffkit.sampling import run as run_loop
from diffkit.spec import (
    OPTIONAL_SECTIONS,
    SECTIONS,
    SampleConfig,
    Spec,
    TrainConfig,
    check_seed,
    complete_saved_spec,
    dump_spec,
    iter_sections,
    load_spec,
    parse_spec_file,
    to_dict,
    upgrade_spec,
    using_registry,
    validate_spec,
)
from diffkit.train import (
    EMA,
    MetricsLog,
    Outputs,
    TrainResult,
    _autocast,
    _summary_writer_class,
    resolve_device,
    train,
)

__all__ = ["Pipeline", "check_guidance_scale"]  # check_guidance_scale: from diffkit.guidance, as before

Config = str | Mapping[str, Any] | BaseModel
Labels = int | Sequence[int] | Tensor

SPEC_FILE = "spec.yaml"
WEIGHTS_FILE = "denoiser.safetensors"
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"
FIXED_ON_RESUME = ("seed", "data", "schedule", "denoiser", "objective", "train.batch_size", "train.grad_accum", "train.log_every")
"""Spec entries a resumed run may never change: they fix what the checkpoint's weights,
data position and running loss mean. Others (more steps, another lr, ...) may change
when the caller allows it."""
REFERENCE_POINTS = 5000
"""Training points a run saves to draw beside its samples, so that sampling never reads the data."""
REFERENCE_IMAGES = 64
"""Training images a run saves for ``diffkit forward`` to noise, so that it never reads the data."""
SAMPLE_BATCH_VALUES = 2**20
"""Values (samples × values per sample) drawn at once by default: one float32 state of 4 MB."""
MAX_SAMPLE_BATCH = 10_000
"""The largest default batch of samples, however small one sample is."""
PICTURE_LIMITS = {"images": 2_500, "points": 200_000}
"""The most samples one picture shows: a 50 × 50 grid of images, or a scatter of points."""
FORWARD_LIMITS = {"examples": 64, "points": 100_000, "frames": 32}
"""The most data examples (image rows), points and timesteps a picture of the forward process shows."""


def clear_training_outputs(out: str | Path) -> None:
    """Delete what an earlier training run left in the run directory ``out`` that a new run
    must not append to or resume from — its ``metrics.jsonl`` and its checkpoints — so that
    ``fit(out=out)`` starts over there. (``diffkit train --force`` deletes nothing: it moves
    the old run aside.)"""
    out = Path(out)
    (out / METRICS_FILE).unlink(missing_ok=True)
    CheckpointDir(out / CHECKPOINTS_DIR, keep=1).clear()


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
        guidance: Config | GuidanceMethod | None = None,
        *,
        data: Config | Dataset | None = None,
        shape: tuple[int, ...] | None = None,
        train: Mapping[str, Any] | TrainConfig | None = None,
        sample: Mapping[str, Any] | SampleConfig | None = None,
        seed: int = 0,
        requires: Sequence[str] = (),
        registry: Registry | None = None,
        _context: BuildContext | None = None,
    ) -> None:
        check_requirements(requires)
        self.requires = tuple(requires)
        self.registry = registry or get_registry()
        self.seed = check_seed(seed)
        self.train_config = train if isinstance(train, TrainConfig) else TrainConfig.model_validate(train or {})
        self.sample_config = sample if isinstance(sample, SampleConfig) else SampleConfig.model_validate(sample or {})
        self._dataset: Dataset | None = None
        self._data_config: dict[str, Any] | None = None
        self._run_dir: Path | None = None  # set by load(): reading a run builds no data unless asked
        self._reference: tuple[Tensor, Tensor] | None = None  # training points shown beside samples
        if isinstance(data, Dataset):
            self._dataset = data
        elif data is not None:
            self._data_config = _as_config(data)
        self.context = _context or self._infer_context(shape)
        # The initial weights are a function of the seed (so that two runs of one spec, or
        # a run and its resumption, start alike), drawn without touching torch's generator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.schedule: Process = self._build("schedule", schedule)
            self.denoiser: nn.Module = self._build("denoiser", denoiser)
            self.objective: Objective = self._build("objective", objective)
            if isinstance(sampler, Mapping) and guidance is None:  # a section of an earlier release's form
                upgraded = upgrade_spec({"sampler": sampler})
                sampler, guidance = upgraded["sampler"], upgraded.get("guidance")
            self.sampler: Sampler = self._build("sampler", sampler)
            self.guidance: GuidanceMethod | None = None if guidance is None else self._build("guidance", guidance)
        self._check_loop_sampler(self.sampler)
        # Standardisation of point data, fitted on the training set (None for images).
        self.data_mean: Tensor | None = None
        self.data_std: Tensor | None = None
        # [low, high] of the standardised training data per coordinate, widened (point data):
        # the default bound on x̂_0 when sampling (diffkit.diffusion.data_range).
        self.data_range: Tensor | None = None
        self._per_thread = _PerThread()  # what a sampling call leaves behind, per thread
        self._online: nn.Module | None = None  # the raw trained weights; self.denoiser holds their EMA
        self.steps_trained = 0
        for part in self.parts():
            if hasattr(part, "attach"):
                part.attach(self)

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
            sample=spec.sample,
            seed=spec.seed,
            requires=spec.requires,
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
            sample_shape=tuple(ds.sample_shape),
            num_classes=ds.num_classes,
            seed=self.seed,
            data_kind=ds.kind,
            data_diameter=data_diameter(ds),
        )

    def _build(self, kind: str, value: Any) -> Any:
        if isinstance(value, (str, Mapping, BaseModel)):
            with using_registry(self.registry):  # nested sections come from it too
                if kind == "denoiser":
                    self._check_size(kind, value)
                return self.registry.build(kind, value, self.context)
        return value

    def entry_of(self, obj: Any, kind: str) -> Entry | None:
        """The registry entry a component was built from (``None`` for one built by hand)."""
        tag = (getattr(obj, "__diffkit_spec__", None) or {}).get("type")
        try:
            return None if tag is None else self.registry.get(kind, str(tag))
        except DiffkitError:
            return None

    def _check_loop_sampler(self, sampler: Any) -> None:
        """Refuse a plugin API version 1 sampler (a whole loop over a table) on a continuous process."""
        entry = self.entry_of(sampler, "sampler")
        why = None if entry is None else loop_sampler_problem(entry, sampler, self.schedule)
        if why is not None:
            raise DiffkitError(why)

    @contextmanager
    def plugin_faults(self, stage: str) -> Iterator[None]:
        """Turn an exception raised inside a third-party plugin's code while the pipeline runs
        it (``stage``: "training", "sampling") into one error naming the plugin, the component
        and its section; the exception stays the error's ``__cause__`` (``--debug``)."""
        try:
            yield
        except (DiffkitError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
                raise
            entry = self._faulting_entry(exc)
            if entry is None:
                raise
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
            raise PluginError(
                f"{entry.described} raised {type(exc).__name__} while {stage} (spec section '{entry.kind}'): {text}."
                " This is a fault in the plugin's code; report it to the plugin's authors (rerun with --debug for the"
                " traceback)"
            ) from exc

    def _faulting_entry(self, exc: BaseException) -> Entry | None:
        """The pipeline's component of a third-party plugin whose module the innermost frame of
        ``exc``'s traceback that lies in any plugin's module belongs to."""
        packages: dict[str, Entry] = {}
        for kind in ("schedule", "denoiser", "objective", "sampler"):
            obj = getattr(self, kind)
            entry = self.entry_of(obj, kind)
            if entry is not None and entry.distribution != "diffkit":
                packages.setdefault(str(getattr(entry.component.factory, "__module__", "")).split(".")[0], entry)
                packages.setdefault(type(obj).__module__.split(".")[0], entry)
        for shared in ("", "diffkit", "diffkit_plugins", "torch", "builtins"):  # a plugin's objects may be of these
            packages.pop(shared, None)
        if not packages:
            return None
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            frames.append(str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0])
            tb = tb.tb_next
        for package in reversed(frames):
            if package in packages:
                return packages[package]
        return None

    def _first_output_check(self) -> Callable[..., None]:
        """A forward hook for the network being trained: the output of its first call (the
        first training step) must have the input's shape; then it takes itself out."""
        done = False

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            nonlocal done
            if not done and args and isinstance(args[0], Tensor):
                done = True
                self._check_output(output, args[0])

        return hook

    def _check_output(self, out: Any, x_t: Tensor) -> None:
        if isinstance(out, Tensor) and out.shape == x_t.shape:
            return
        entry = self.entry_of(self.denoiser, "denoiser")
        what = entry.described if entry is not None else f"the denoiser {type(self.denoiser).__name__}"
        got = f"a tensor of shape {list(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
        raise DiffkitError(
            f"{what} returned {got} for x_t of shape {list(x_t.shape)}; a denoiser must return a tensor of x_t's shape"
            " (docs/plugins.md, diffkit_denoisers)"
        )

    def _check_size(self, kind: str, value: Config, nbytes: int | None = None, **training: Any) -> None:
        """Refuse a network too large for the memory before allocating it (``nbytes``
        counted on the meta device unless given), naming the spec fields (those changed
        from their defaults) that set its size."""
        if nbytes is None:
            try:
                nbytes = memory.network_bytes(lambda: self.registry.build(kind, value, self.context))
            except PluginError:  # it cannot build on the meta device; building it for real reports its fault
                nbytes = None
        if nbytes is None:
            return
        config = _as_config(value)
        defaults = self.registry.get(kind, str(config.get("type"))).component.params.model_fields

        def sizes(v: Any) -> bool:
            return (isinstance(v, int) and not isinstance(v, bool)) or (
                isinstance(v, list) and bool(v) and all(isinstance(i, int) for i in v)
            )

        given = {k: v for k, v in config.items() if k != "type" and sizes(v)}
        changed = {k: v for k, v in given.items() if k not in defaults or defaults[k].default != v} or given
        fields = [f"{kind}.{k} ({v})" for k, v in changed.items()]
        memory.check_network_size(nbytes, f"{kind} '{config.get('type')}'", fields, **training)

    def parts(self) -> list[Any]:
        """The components' networks with state of their own (:class:`diffkit.guidance.StatefulPart`):
        trained by :meth:`fit` after the denoiser, saved and loaded with the run."""
        parts = getattr(self.guidance, "parts", None)
        return list(parts()) if parts is not None else []

    def normalizer(self) -> Callable[[Tensor], Tensor] | None:
        """Data coordinates → model space (point data's standardisation), ``None`` where there is none."""
        return self._normalize if self.data_mean is not None else None

    @property
    def dataset(self) -> Dataset:
        """The training data, built from the spec on first use."""
        if self._dataset is None:
            if self._data_config is None:
                raise DiffkitError("this pipeline has no data; pass data=... to Pipeline or to fit()")
            self._dataset = self.build_data(self._data_config)
        return self._dataset

    def build_data(self, section: dict[str, Any]) -> Dataset:
        """Build the data ``section``; as a loaded run reads it (:meth:`reading_section`)
        where this pipeline was loaded from a run."""
        reading = self.reading_section(section)
        try:
            return self.registry.build("data", reading, BuildContext(seed=self.seed))
        except DiffkitError as exc:
            if reading is section:
                raise
            raise DiffkitError(
                f"{exc} Reading the run {self._run_dir} never downloads data, whatever its spec's download: says"
            ) from None

    def reading_section(self, section: dict[str, Any]) -> dict[str, Any]:
        """A data ``section`` as a loaded run reads it: never downloading (a run's data
        is read where it lies, and nothing is written outside the run directory)."""
        if self._run_dir is None or not section.get("download", True):
            return section
        try:
            fields = self.registry.get("data", section["type"]).component.params.model_fields
        except (DiffkitError, KeyError, AttributeError):
            return section
        return {**section, "download": False} if "download" in fields else section

    def reference_data(self) -> tuple[Tensor, Tensor] | None:
        """Training examples and labels that a run keeps so that reading it needs no data:
        up to :data:`REFERENCE_POINTS` points (drawn beside samples) or
        :data:`REFERENCE_IMAGES` images (what ``diffkit forward`` noises). A loaded run's
        saved ones (``None`` for a run saved without them); else the data's first ones."""
        if self._reference is not None or self._run_dir is not None:
            return self._reference
        k = REFERENCE_POINTS if self.context.data_kind == "points" else REFERENCE_IMAGES
        try:
            dataset = self.dataset
            tensors = dataset.tensors()
            if tensors is None:
                items = [dataset[i] for i in range(min(k, len(dataset)))]
                tensors = (torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items]))
        except DiffkitError:
            return None
        return tensors[0][:k], tensors[1][:k]

    @property
    def spec(self) -> Spec:
        """The spec of this pipeline; ``Pipeline.from_spec(pipe.spec)`` builds an equivalent one."""
        body: dict[str, Any] = {"seed": self.seed, "train": self.train_config.model_dump(mode="json")}
        if self.sample_config != SampleConfig():
            body["sample"] = self.sample_config.model_dump(mode="json")
        if self.requires:
            body["requires"] = list(self.requires)
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
            if obj is None and section in OPTIONAL_SECTIONS:
                continue
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
        resume: bool = False,
        allow_spec_change: bool = False,
        **overrides: Any,
    ) -> TrainResult:
        """Train per ``self.train_config``; keyword overrides (``steps=100``) apply to this call.

        ``out`` is the run directory: metrics are appended to ``out/metrics.jsonl`` (and
        to TensorBoard with ``train.log: tensorboard``), checkpoints go to
        ``out/checkpoints/`` every ``train.checkpoint_every`` steps and at the end, and
        pictures of samples to ``out/samples/`` every ``train.sample_every`` steps.
        ``resume=True`` continues from the newest checkpoint there that reads back whole,
        ending exactly where an uninterrupted run would; the spec must be the
        checkpoint's, or differ only outside :data:`FIXED_ON_RESUME` with
        ``allow_spec_change=True``. Under ``torchrun`` each process trains on its shard of
        the data and only rank 0 writes. While it trains, ``out`` is locked
        (``out/.diffkit.lock``): a second trainer of the same directory is refused.
        """
        if out is None or distributed.env_rank() != 0:
            return self._fit(data, out=out, progress=progress, resume=resume, allow_spec_change=allow_spec_change, **overrides)
        with rundir.lock(out, say=lambda msg: print(f"diffkit: {msg}", file=sys.stderr)):
            return self._fit(data, out=out, progress=progress, resume=resume, allow_spec_change=allow_spec_change, **overrides)

    def check_training(self, data: Dataset | None = None, **overrides: Any) -> tuple[TrainConfig, Dataset]:
        """Everything :meth:`fit` needs, checked before it writes anything (what ``diffkit
        train --force`` checks before it moves an old run aside): the settings with
        ``overrides``, the device, the precision, the logging extras and the data (read
        here, and checked against the denoiser). Returns the settings and the data."""
        config = TrainConfig.model_validate({**self.train_config.model_dump(), **overrides})
        self.check_picture(config.preview, "train.preview")
        dataset = data if data is not None else self.dataset
        if tuple(dataset.sample_shape) != self.context.sample_shape:
            raise DiffkitError(
                f"the data's samples have shape {tuple(dataset.sample_shape)} but the pipeline was built for"
                f" {self.context.sample_shape}"
            )
        device = resolve_device(config.device)
        _autocast(config.precision, device)
        if config.log == "tensorboard":
            _summary_writer_class()
        if config.batch_size > len(dataset):
            raise DiffkitError(f"train.batch_size ({config.batch_size}) exceeds the dataset's {len(dataset)} examples; lower it")
        section = getattr(self.denoiser, "__diffkit_spec__", None)
        if section is not None:  # a network built by hand is the caller's to size
            held = "to train: the weights, their EMA, the gradients and AdamW's two moments"
            nbytes = memory.module_bytes(self.denoiser)
            self._check_size("denoiser", section, nbytes, copies=memory.TRAINING_COPIES, held=held, device=device)
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
        return config, dataset

    def _fit(
        self,
        data: Dataset | None,
        *,
        out: str | Path | None,
        progress: bool,
        resume: bool,
        allow_spec_change: bool,
        **overrides: Any,
    ) -> TrainResult:
        config, dataset = self.check_training(data, **overrides)
        if resume and out is None:
            raise DiffkitError("resume=True continues the run in a directory: give it as out=")
        dist = distributed.setup(resolve_device(config.device))
        device = dist.device
        self._fit_normalizer(dataset)
        classes = getattr(self.denoiser, "num_classes", None)
        outputs, found = (None, None) if out is None else self._outputs(Path(out), config, dist, resume, allow_spec_change)
        if found is not None and "data.mean" in found.tensors:
            self.data_mean, self.data_std = found.tensors["data.mean"], found.tensors["data.std"]
            self.data_range = found.tensors.get("data.range", self.data_range)
        if outputs is not None and self.data_mean is not None and self.data_std is not None:
            outputs.checkpoint_tensors = {"data.mean": self.data_mean, "data.std": self.data_std}
            if self.data_range is not None:
                outputs.checkpoint_tensors["data.range"] = self.data_range
        online = self._online if self._online is not None else copy.deepcopy(self.denoiser)
        online.to(device)
        self.denoiser.to(device)
        ema = EMA(online, config.ema_decay, target=self.denoiser)
        ema.updates = self.steps_trained
        if dist.is_writer and (dist.distributed or config.grad_accum > 1):
            print(
                f"diffkit: training on {dist.world_size} process{'es' if dist.distributed else ''}"
                f"{f' ({dist.backend}, {device.type})' if dist.backend else ''}: effective batch size"
                f" {config.batch_size} × {config.grad_accum} accumulated × {dist.world_size} ="
                f" {config.batch_size * config.grad_accum * dist.world_size}",
                file=sys.stderr,
            )
        first_output = online.register_forward_hook(self._first_output_check())
        try:
            with self.plugin_faults("training"):
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
                    outputs=outputs,
                    resume=found,
                    dist=dist,
                    progress=progress,
                    start_step=self.steps_trained,
                )
        finally:
            first_output.remove()
        self._online = online
        self.steps_trained += result.steps
        self.denoiser.eval()
        for part in self.parts():
            report = part.fit(self, dataset, config, device, out if dist.is_writer else None, progress)
            result.parts[part.name] = report
            if report is not None and (progress or out is not None):  # `diffkit train --no-progress` shows it too
                print(str(report), file=sys.stderr)
        return result

    def _outputs(
        self, out: Path, config: TrainConfig, dist: DistContext, resume: bool, allow_spec_change: bool
    ) -> tuple[Outputs, TrainingCheckpoint | None]:
        """The run directory's checkpoints, metrics and pictures, and the checkpoint to resume from."""
        checkpoints = CheckpointDir(out / CHECKPOINTS_DIR, config.keep_checkpoints)
        spec = self._spec_or_none(config)
        say = (lambda msg: print(f"diffkit: {msg}", file=sys.stderr)) if dist.is_writer else (lambda msg: None)
        found = None
        if resume:
            if self.steps_trained:
                raise DiffkitError(
                    f"resume=True continues a run from its checkpoints, so it needs a pipeline fresh from its spec;"
                    f" this one has trained {self.steps_trained} steps already"
                )
            damaged: list[str] = []
            found = checkpoints.latest(damaged.append)
            if found is None:
                damaged = [msg.removesuffix("; trying the one before") for msg in damaged]
                what = f"every checkpoint is damaged ({'; '.join(damaged)})" if damaged else "it holds no checkpoint"
                raise DiffkitError(
                    f"nothing to resume in {checkpoints.directory}: {what}. Nothing was changed; to train this run"
                    " anew, pass --force (diffkit train), which moves the old run aside"
                )
            else:
                for msg in damaged:
                    say(msg)
                _check_resumable(found, spec, dist, allow_spec_change, config.steps, self.registry)
                say(f"resuming from {found.name} in {checkpoints.directory}")
        elif dist.is_writer and self.steps_trained == 0 and checkpoints.exists():
            raise DiffkitError(
                f"{checkpoints.directory} holds the checkpoints of an earlier run; resume it (diffkit train --resume,"
                " or fit(resume=True)) or delete them (diffkit train --force) to start over"
            )
        outputs = Outputs(
            checkpoints=checkpoints, checkpoint_state={"spec": spec, "diffkit_version": diffkit.__version__}, say=say
        )
        if dist.is_writer:
            out.mkdir(parents=True, exist_ok=True)
            checkpoints.remove_leftovers()
            tensorboard = out / TENSORBOARD_DIR if config.log == "tensorboard" else None
            outputs.metrics = MetricsLog(out / METRICS_FILE, tensorboard)
            if config.sample_every and config.preview:
                outputs.on_sample = self._sample_pictures(out / SAMPLES_DIR, config.preview)
        return outputs, found

    def _spec_or_none(self, config: TrainConfig) -> dict[str, Any] | None:
        """The spec this training runs, ``config`` included, as plain data; ``None`` where
        the pipeline has none (data or components given as objects)."""
        try:
            spec = self.spec
        except DiffkitError:
            return None
        return {**to_dict(spec), "train": config.model_dump(mode="json")}

    def _sample_pictures(self, directory: Path, n: int) -> Callable[[int], None]:
        """A picture of ``n`` samples from the EMA weights at a step, drawn from the spec's
        seed on generators of their own, so training's random draws are left untouched."""

        def draw(step: int) -> None:
            cuda = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                samples = self.sample(n, seed=self.seed, progress=False)
            self.picture(samples, directory / f"step-{step:08d}.png", title=f"samples at step {step}")

        return draw

    def _fit_normalizer(self, dataset: Dataset) -> None:
        """Standardise point data per coordinate, once, from the training set, and record the
        standardised data's range, widened, as the default bound on x̂_0."""
        if dataset.kind != "points" or (self.data_mean is not None and self.data_range is not None):
            return
        tensors = dataset.tensors()
        if tensors is None:
            raise DiffkitError("point data must live in memory (Dataset.tensors()) to be standardised")
        x = tensors[0].double()
        if self.data_mean is None or self.data_std is None:
            self.data_mean = x.mean(0).float()
            self.data_std = x.std(0).clamp_min(1e-8).float()
        self.data_range = D.data_range((x - self.data_mean.double()) / self.data_std.double()).float()

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
        given = self.conditional_predictor()
        return lambda x_t, t: given(x_t, t, cond)

    def conditional_predictor(self, network: Any = None) -> CondPredict:
        """``predict(x_t, t, cond) -> ε̂`` under any labels (−1 or ``None``: no label), what
        guidance wraps; an unconditional denoiser ignores the labels. ``network`` stands in
        for the denoiser (its compiled form, or another network of the same kind, e.g.
        autoguidance's guide)."""
        net, objective, process = network if network is not None else self.denoiser, self.objective, self.schedule

        def predict(x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
            out = network_output(net, process, x_t, t, cond)
            self._check_output(out, x_t)
            return objective.to_eps(out, x_t, t, process)

        return predict

    def denoise_fn(self, cond: Tensor | None = None, predict: Predict | None = None, net: Any = None) -> DenoiseFn:
        """``denoise(x_t, t) -> Denoised(x̂_0, ε̂)``: what a step sampler sees of the model.

        From the network through the objective's exact conversion; with ``predict`` (an
        ε̂-prediction, e.g. a guided one) from that, x̂_0 = (x_t − σ ε̂)/α."""
        net, objective, process = self.denoiser if net is None else net, self.objective, self.schedule
        if predict is not None:
            return denoise_from_eps(predict, process)

        def denoise(x_t: Tensor, t: Tensor) -> Denoised:
            tt = table_time(process, t)
            out = network_output(net, process, x_t, tt, cond)
            self._check_output(out, x_t)
            d = objective.denoised(out, x_t, tt, process)
            return d if isinstance(d, Denoised) else Denoised(*d)

        return denoise

    def run_sampler(
        self,
        chosen: Any,
        shape: Sequence[int],
        *,
        cond: Tensor | None = None,
        guidance: Mapping[str, Any] | None = None,
        predict: Predict | None = None,
        bound: D.X0Bound | None = None,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        progress: bool = False,
        callback: StepCallback | None = None,
        x_start: Tensor | None = None,
        t_start: float | None = None,
        noise: SampleNoise | None = None,
        net: Any = None,
    ) -> Tensor:
        """Run ``chosen`` once over a batch of ``shape`` (model space).

        A step sampler (plugin API 2) runs in :func:`diffkit.sampling.run` on
        :meth:`denoise_fn` of the prediction guided by the pipeline's guidance toward
        ``cond`` (:meth:`guided_predictor`, with the options ``guidance``) where it guides,
        bounded as its ``clip_denoised`` says (``predict``, if given, replaces the
        network's ε̂); a 0.1 sampler (a whole loop) is called with ``predict`` on a
        discrete table. ``noise`` makes a step sampler's draws per sample
        (:mod:`diffkit.noise`); without it they come from ``generator``. ``net`` stands in
        for the denoiser (its compiled form)."""
        device = self.device
        if is_step_sampler(chosen):
            if predict is None:
                predict = self.guided_predictor(cond, guidance or {}, net)
            denoise = self.denoise_fn(cond, predict, net)
            if bound is not None:
                denoise = bound.denoised(denoise)
            try:
                return run_loop(
                    chosen,
                    denoise,
                    self.schedule,
                    shape,
                    steps=steps,
                    generator=generator,
                    device=device,
                    progress=progress,
                    callback=callback,
                    x_start=x_start,
                    t_start=t_start,
                    noise=noise,
                )
            except ValueError as e:
                raise DiffkitError(str(e)) from None
        entry = self.entry_of(chosen, "sampler")
        why = None if entry is None else loop_sampler_problem(entry, chosen, self.schedule)
        if why is not None:
            raise DiffkitError(why)
        if not isinstance(self.schedule, Schedule):
            raise DiffkitError(
                f"the sampler {type(chosen).__name__} is written for 0.1's discrete tables (a whole loop over"
                f" integer timesteps) and this model's process is continuous; use a sampler of the core's loop"
                " (ddpm, ddim, dpm-solver, euler, heun, euler-ancestral, sde, ode), or see docs/plugins.md for"
                " how to write it as a step"
            )
        return chosen(
            predict if predict is not None else self.predictor(cond),
            self.schedule,
            shape,
            generator=generator,
            steps=steps,
            device=device,
            progress=progress,
            callback=callback,
            x_start=x_start,
            t_start=None if t_start is None else int(t_start),
        )

    @property
    def device(self) -> torch.device:
        p = next(self.denoiser.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def x0_bound(self, sampler: Sampler | None = None) -> D.X0Bound | None:
        """The bound on x̂_0 that sampling with ``sampler`` (default: the pipeline's) applies
        to every prediction, in model space, from its ``clip_denoised`` (``"auto"`` where it
        has none); ``None`` for ``clip_denoised: null``; ``"dynamic"``: dynamic thresholding.

        ``"auto"``: images [−1, 1]; point data the standardised training data's range recorded
        at training (:func:`diffkit.diffusion.data_range`), or ±:data:`diffkit.diffusion.FALLBACK_BOUND`
        for a run that recorded none. A number c: [−c, c].
        """
        chosen = self.sampler if sampler is None else sampler
        option = getattr(chosen, "clip_denoised", getattr(getattr(chosen, "params", None), "clip_denoised", "auto"))
        if option is None:
            return None
        if option == "dynamic":
            return D.X0Bound(self.schedule, None, None)
        if option != "auto":
            low, high = torch.tensor(-float(option)), torch.tensor(float(option))
        elif self.context.data_kind == "images":
            low, high = torch.tensor(-1.0), torch.tensor(1.0)
        elif self.data_range is not None:
            low, high = self.data_range[0], self.data_range[1]
        else:
            low, high = torch.tensor(-D.FALLBACK_BOUND), torch.tensor(D.FALLBACK_BOUND)
        return D.X0Bound(self.schedule, low.to(self.device), high.to(self.device))

    def compiled_network(self) -> CompiledNetwork:
        """The denoiser through ``torch.compile`` (:class:`diffkit.compiled.CompiledNetwork`),
        built once per pipeline and kept while the denoiser stays the same object."""
        held = self.__dict__.get("_compiled")
        if held is None or held.net is not self.denoiser:
            held = self.__dict__["_compiled"] = CompiledNetwork(self.denoiser)
        return held

    @property
    def _bound(self) -> D.X0Bound | None:
        """The bound on x̂_0 of this thread's last sampling call (each thread sees its own)."""
        return getattr(self._per_thread, "bound", None)

    @_bound.setter
    def _bound(self, bound: D.X0Bound | None) -> None:
        self._per_thread.bound = bound

    @property
    def last_clipped(self) -> float | None:
        """Share of the x̂_0 values predicted in the last :meth:`sample` (or application) call
        that its bound moved; ``None`` where x̂_0 was not bounded (``clip_denoised: null``) or
        nothing was sampled yet. ``diffkit sample`` reports it when it is above 0."""
        return None if self._bound is None else self._bound.share

    def _check_finite(self, x: Tensor, guidance_scale: float | None = None, labelled: bool = False) -> None:
        """Refuse samples holding NaN or ±inf, naming the likely cause."""
        finite = torch.isfinite(x.flatten(1)).all(1)
        if bool(finite.all()):
            return
        bad = int((~finite).sum())
        nets = [("the denoiser's weights", self.denoiser)]
        nets += [(f"the guidance's {part.name}", part.module) for part in self.parts()]
        cause = None
        for what, net in nets:
            for name, tensor in net.state_dict().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    cause = (
                        f"{what} hold NaN or infinite values ({name}): the run's weights are damaged or its"
                        " training diverged; train again or use an earlier checkpoint"
                    )
                    break
            if cause:
                break
        stats = [("data.mean", self.data_mean), ("data.std", self.data_std), ("data.range", self.data_range)]
        for name, tensor in stats:
            if cause is None and tensor is not None and not bool(torch.isfinite(tensor).all()):
                cause = f"the run's {name} holds NaN or infinite values; train again"
        if cause is None and labelled and self.guidance is not None:
            scale = getattr(self.guidance, "scale", None) if guidance_scale is None else guidance_scale
            cause = f"the guidance scale ({scale}) is likely too large for this model; try a smaller one"
        if cause is None and self._bound is None:
            cause = "x̂_0 was not bounded (clip_denoised: null); leave clip_denoised at its default, 'auto'"
        if cause is None:
            cause = "the sampler diverged; try more steps or another sampler"
        raise DiffkitError(f"sampling produced NaN or infinite values in {bad} of {x.shape[0]} samples: {cause}")

    def sample(
        self,
        n: int,
        seed: int | None = None,
        sampler: Config | Sampler | None = None,
        steps: int | None = None,
        *,
        labels: Labels | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        guidance_rescale: float | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        callback: StepCallback | None = None,
        noise: NoiseMode = "per-sample",
        compile: bool | None = None,
    ) -> Tensor:
        """Draw ``n`` samples in the data's own coordinates (standardisation undone).

        ``sampler`` overrides the pipeline's (a name, a section or an object); ``steps``
        asks for another number of reverse steps; ``batch_size`` (default :meth:`default_batch_size`)
        bounds the memory of sampling by drawing in chunks, though the ``n`` samples
        returned are held together (:meth:`sample_batches` yields them chunk by chunk).
        A ``seed`` fixes every sample on its own: sample i of ``sample(n, seed)`` is sample i
        of ``sample(m, seed)`` for any n, m > i, any ``batch_size`` and any device (the noise
        is per sample, :mod:`diffkit.noise`; only the network's float rounding may differ).
        ``noise="batch"`` draws as 0.1 did, from one generator across the batch (the samples
        then depend on ``n`` and ``batch_size``); samplers written as whole loops (plugin
        API 1) always do. ``compile=True`` (default: the spec's ``sample.compile``) runs the
        network through ``torch.compile`` (:mod:`diffkit.compiled`: compiled once per pipeline,
        cached on disk, uncompiled with a one-line notice where compiling fails).
        ``callback(t, x_t)`` sees every state of every chunk, in model space.

        ``labels`` (one class for all, or one per sample; −1 is "no label") asks for
        samples of those classes: from a conditional denoiser, and steered by the
        pipeline's guidance (its spec's ``guidance:`` section) where it has one, under any
        sampler. ``guidance_scale``, ``guidance_interval`` ``(lo, hi)`` (in the guidance's
        ``interval_in`` units) and ``guidance_rescale`` (φ) override the spec's; a guidance
        that needs no labels (autoguidance, a reward) guides without them.
        """
        chunks = list(
            self.sample_batches(
                n,
                seed,
                sampler,
                steps,
                labels=labels,
                guidance_scale=guidance_scale,
                guidance_interval=guidance_interval,
                guidance_rescale=guidance_rescale,
                batch_size=batch_size,
                progress=progress,
                callback=callback,
                noise=noise,
                compile=compile,
            )
        )
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def default_batch_size(self) -> int:
        """Samples drawn at once unless a batch size is given: as many as make
        :data:`SAMPLE_BATCH_VALUES` values (one float32 state of 4 MB), at most
        :data:`MAX_SAMPLE_BATCH`, whatever the number of samples asked for."""
        values = math.prod(self.context.sample_shape) or 1
        return max(1, min(MAX_SAMPLE_BATCH, SAMPLE_BATCH_VALUES // values))

    def sample_batches(
        self,
        n: int,
        seed: int | None = None,
        sampler: Config | Sampler | None = None,
        steps: int | None = None,
        *,
        labels: Labels | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        guidance_rescale: float | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        callback: StepCallback | None = None,
        noise: NoiseMode = "per-sample",
        compile: bool | None = None,
    ) -> Iterator[Tensor]:
        """:meth:`sample`'s ``n`` samples, chunk by chunk of ``batch_size`` as they are
        drawn (on the CPU, in data coordinates), so that only one chunk is held at a time.
        Every argument is checked before this returns."""
        if n < 1:
            raise DiffkitError(f"the number of samples must be at least 1, got {n}")
        if batch_size is not None and batch_size < 1:
            raise DiffkitError(f"the batch size must be at least 1, got {batch_size}")
        check_guidance_scale(guidance_scale)
        if steps is not None and self.schedule.discrete and not 1 <= steps <= self.schedule.T:
            raise DiffkitError(f"steps must be between 1 and the schedule's T = {self.schedule.T}, got {steps}")
        if steps is not None and steps < 1:
            raise DiffkitError(f"steps must be at least 1, got {steps}")
        chosen = self.sampler if sampler is None else self._build("sampler", sampler)
        device = self.device
        y = None if labels is None else self._labels(labels, n)
        options = {"scale": guidance_scale, "interval": guidance_interval, "rescale_phi": guidance_rescale}
        self._guidance_for(y, options)  # every check before this returns
        if noise not in ("per-sample", "batch"):
            raise DiffkitError(f"noise must be 'per-sample' or 'batch', got {noise!r}")
        seeded = seed is not None
        seed = check_seed(seed) if seed is not None else fresh_seed()
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        compile = self.sample_config.compile if compile is None else compile
        net = self.compiled_network() if compile else None
        given = self.conditional_predictor(net)
        bound = self._bound = self.x0_bound(chosen)
        stepped = is_step_sampler(chosen)
        # a step sampler's bound is applied by the loop (run_sampler); a 0.1 sampler's wraps its ε̂
        finish: Callable[[Predict], Predict] = bound if bound is not None and not stepped else (lambda p: p)
        batch = batch_size or self.default_batch_size()

        def draw() -> Iterator[Tensor]:
            self.denoiser.eval()
            for start in range(0, n, batch):
                m = min(batch, n - start)
                predict: Predict | None = None
                y_chunk = None if y is None else y[start : start + m].to(device)
                cond: Tensor | None = y_chunk if stepped else None
                if not stepped:  # a 0.1 sampler is handed ε̂ whole: guided here, and bounded
                    guided = self.guided_predictor(y_chunk, options, net)
                    predict = finish(guided if guided is not None else (lambda x_t, t, c=y_chunk: given(x_t, t, c)))
                global_state = torch.get_rng_state() if seeded else None
                with torch.inference_mode(), self.plugin_faults("sampling"):
                    x = self.run_sampler(
                        chosen,
                        (m, *self.context.sample_shape),
                        cond=cond,
                        guidance=options,
                        predict=predict,
                        bound=bound,
                        generator=generator,
                        steps=steps,
                        progress=progress,
                        callback=callback,
                        noise=SampleNoise(seed, start, m) if noise == "per-sample" else None,
                        net=net,
                    )
                    if global_state is not None and not torch.equal(global_state, torch.get_rng_state()):
                        raise DiffkitError(self._global_rng_message(chosen, seed))
                    x = self.denormalize(x)
                    self._check_finite(x, guidance_scale, labelled=y is not None)
                    x = x.cpu()
                yield x

        return draw()

    def _global_rng_message(self, chosen: Any, seed: int | None) -> str:
        """Sampling drew from torch's global generator: name the components that may have."""
        parts = [(chosen, "sampler"), (self.denoiser, "denoiser")]
        entries = [e for obj, kind in parts if (e := self.entry_of(obj, kind)) is not None]
        suspects = [e.described for e in entries if e.distribution != "diffkit"] or [e.described for e in entries]
        return (
            f"sampling drew random numbers from torch's global generator, so seed={seed} does not reproduce these"
            f" samples; {' or '.join(suspects) or 'a component built by hand'} must draw its noise from the sampling"
            " loop (ctx.noise(x) in a step; the generator argument in a 0.1 sampler). diffkit.testing.check_sampler"
            " finds which"
        )

    def _labels(self, labels: Labels, n: int) -> Tensor:
        """``labels`` as ``[n]`` long, checked against the data's classes."""
        classes = self.context.num_classes
        if not classes:
            raise DiffkitError("this pipeline's data has no labels, so it cannot sample by label; train on labelled data")
        y = torch.as_tensor(labels).long().reshape(-1).cpu()
        if y.numel() not in (1, n):
            raise DiffkitError(f"labels must be one class or one per sample ({n}), got {y.numel()}")
        bad = y[(y < -1) | (y >= classes)]
        if bad.numel():
            raise DiffkitError(
                f"label {bad[0].item()} is out of range: the data has {classes} classes, 0 to {classes - 1}"
                " (−1 asks for no label)"
            )
        return y.clone().expand(n)  # one class for all: a view, not a copy per sample

    def guided_predictor(
        self, cond: Tensor | None, options: Mapping[str, Any] | None = None, network: Any = None
    ) -> Predict | None:
        """``predict(x_t, t) -> ε̃``: the model's prediction under labels ``cond`` wrapped by
        the pipeline's guidance (:func:`diffkit.guidance.guide`; ``options``: ``scale``,
        ``interval``, ``rescale_phi`` overriding the spec's), or ``None`` where this call is
        not guided (no guidance, or one that needs labels and none are given). ``network``
        stands in for the denoiser (its compiled form)."""
        options = dict(options or {})
        method = self._guidance_for(cond, options)
        if method is None:
            return None
        model = GuidedModel(
            self.conditional_predictor(network), self.schedule, self.conditional_predictor, self.denormalize
        )
        return guide(method, model, cond, **options)

    def _guidance_for(self, y: Tensor | None, options: Mapping[str, Any]) -> GuidanceMethod | None:
        """The guidance that steers this sampling call (``None``: unguided), after checking
        that the pipeline can sample by these labels with these guidance options."""
        method = self.guidance
        asked = [k for k, v in options.items() if v is not None]
        conditional = bool(getattr(self.denoiser, "num_classes", None))
        if method is None:
            if asked:
                raise DiffkitError(
                    "this model has no guidance to scale; sample without guidance options, or give its spec a"
                    " guidance section (see `diffkit list guidance` and docs/guidance.md)"
                )
            if y is not None and not conditional:
                raise DiffkitError(
                    "this model cannot sample by label: its denoiser is unconditional (no num_classes) and it has"
                    " no guidance. Train a conditional denoiser (denoiser.num_classes) or give its spec a guidance"
                    " section that steers an unconditional one (docs/guidance.md)"
                )
            return None
        if getattr(method, "needs_labels", True) and y is None:
            if asked:
                raise DiffkitError("a guidance scale needs labels to guide toward; give labels as well")
            return None
        if getattr(method, "requires_conditional_denoiser", False) and not conditional:
            raise DiffkitError(
                f"{type(method).__name__} needs a denoiser trained with and without labels, but this one is"
                " unconditional; set denoiser.num_classes and train again"
            )
        if hasattr(method, "with_options"):  # the options checked here, before any sampling
            method.with_options(scale=options.get("scale"), interval=options.get("interval"), rescale=options.get("rescale_phi"))
        scale = getattr(method, "scale", None) if options.get("scale") is None else options["scale"]
        problem = method.check_ready(scale) if hasattr(method, "check_ready") else None
        if problem is not None:
            raise DiffkitError(problem)
        return method

    def trajectory(
        self,
        n: int = 8,
        frames: int = 8,
        seed: int | None = None,
        sampler: Config | Sampler | None = None,
        steps: int | None = None,
        *,
        labels: Labels | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        guidance_rescale: float | None = None,
    ) -> tuple[list[int], Tensor]:
        """The reverse process from noise to data: ``frames`` evenly spaced states of
        ``n`` samples, as ``(timesteps, states [frames, n, ...])`` in data coordinates
        (timestep −1 is the final sample). ``labels`` and the guidance options as in :meth:`sample`."""
        seen: list[tuple[int, Tensor]] = []
        self.sample(
            n,
            seed=seed,
            sampler=sampler,
            steps=steps,
            labels=labels,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            guidance_rescale=guidance_rescale,
            callback=lambda t, x: seen.append((t, x.clone())),
        )
        picks = torch.linspace(0, len(seen) - 1, min(frames, len(seen))).round().long().tolist()
        return [seen[i][0] for i in picks], torch.stack([self.denormalize(seen[i][1]).cpu() for i in picks])

    def forward_process(self, x0: Tensor, timesteps: list[int], seed: int = 0) -> Tensor:
        """Draws of q(x_t | x_0) for each of ``timesteps`` from data ``x0`` (in data
        coordinates), as ``[len(timesteps), N, ...]`` in data coordinates."""
        g = torch.Generator().manual_seed(check_seed(seed))
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
        reference = self.reference_data()
        if reference is not None:
            tensors["data.reference"], tensors["data.reference_labels"] = reference
        if self.data_range is not None:
            tensors["data.range"] = self.data_range
        directory.mkdir(parents=True, exist_ok=True)
        checkpoint.save_tensors(directory / WEIGHTS_FILE, tensors, metadata={"format": "diffkit-pipeline-1"})
        checksums = {WEIGHTS_FILE: checkpoint.sha256_file(directory / WEIGHTS_FILE)}
        for part in self.parts():
            if part.steps_trained > 0:
                name = f"{part.name}.safetensors"
                state = {k: v.contiguous() for k, v in part.module.state_dict().items()}
                checkpoint.save_tensors(directory / name, state, metadata={"format": f"diffkit-{part.name}-1"})
                checksums[name] = checkpoint.sha256_file(directory / name)
        checkpoint.write_json(
            directory / META_FILE,
            {
                "format": 1,
                "diffkit_version": diffkit.__version__,
                "sample_shape": list(self.context.sample_shape),
                "num_classes": self.context.num_classes,
                "data_kind": self.context.data_kind,
                "data_diameter": self.context.data_diameter,
                "steps_trained": self.steps_trained,
                "sha256": checksums,
                "parts": {part.name: part.info() for part in self.parts() if part.steps_trained > 0},
                "components": {
                    path: {"plugin": e.plugin, "distribution": e.distribution, "version": e.version}
                    for path, kind, section in iter_sections(spec)
                    for e in [self.registry.get(kind, section.type)]
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
        meta = _read_meta(directory / META_FILE)
        # each component from the plugin that built it, whatever has been installed since
        raw, changed = checkpoint.resolve_recorded_components(
            parse_spec_file(directory / SPEC_FILE), meta.get("components"), registry, directory
        )
        raw = complete_saved_spec(raw, registry)  # parameters added since it was saved, as it was trained
        try:
            spec = validate_spec(raw, registry, source=str(directory / SPEC_FILE))
            context = BuildContext(
                sample_shape=tuple(meta["sample_shape"]),
                num_classes=meta.get("num_classes"),
                seed=spec.seed,
                data_kind=meta.get("data_kind", "points"),
                data_diameter=meta.get("data_diameter"),
            )
            pipe = cls._from_validated(spec, registry, context)
            pipe._run_dir = directory
            tensors = checkpoint.load_tensors(directory / WEIGHTS_FILE, meta["sha256"].get(WEIGHTS_FILE))
            pipe._load_state(tensors, directory)
        except SpecError as exc:
            if not changed:
                raise
            note = f"(other plugin versions than the run's: {'; '.join(changed)})"
            raise SpecError([*exc.problems, ("", note)], exc.source) from None
        except DiffkitError as exc:
            if not changed:
                raise
            raise DiffkitError(f"{exc} (other plugin versions than the run's: {'; '.join(changed)})") from None
        pipe.steps_trained = int(meta.get("steps_trained", 0))
        pipe._load_parts(directory, meta)
        if device is not None:
            pipe.to(device)
        return pipe

    def _load_state(self, tensors: dict[str, Tensor], directory: Path) -> None:
        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        path = directory / WEIGHTS_FILE
        own = self.denoiser.state_dict()
        _check_tensors(path, tensors, {**{f"denoiser.{k}": v for k, v in own.items()}, **{f"online.{k}": v for k, v in own.items()}})
        expected = self.denoiser.state_dict()
        for prefix in ("denoiser.", "online."):
            saved = part(prefix)
            mismatch = checkpoint.state_dict_mismatch(expected, saved) if saved or prefix == "denoiser." else None
            if mismatch is not None:
                entry = self.entry_of(self.denoiser, "denoiser")
                what = f" ({entry.described})" if entry is not None else ""
                raise DiffkitError(
                    f"the weights in {path} ('{prefix}*') do not fit the denoiser its spec describes{what}: {mismatch}"
                )
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
        self.data_mean, self.data_std = _standardisation(path, tensors, self.context.sample_shape)
        if "data.reference" in tensors and "data.reference_labels" in tensors:
            self._reference = (tensors["data.reference"], tensors["data.reference_labels"])
        self.data_range = tensors.get("data.range")  # absent from runs saved before it was recorded
        if self.data_range is not None and (
            tuple(self.data_range.shape) != (2, *self.context.sample_shape) or not bool(torch.isfinite(self.data_range).all())
        ):
            raise DiffkitError(
                f"data.range in {directory / WEIGHTS_FILE} must be finite and of shape"
                f" {[2, *self.context.sample_shape]}, got {list(self.data_range.shape)}; the file is damaged: train again"
            )
        self.denoiser.eval()

    def _load_parts(self, directory: Path, meta: Mapping[str, Any]) -> None:
        """Load the networks of the components with state where the run has them; a run
        without one's file loads, and sampling that needs it then says that it is missing."""
        for part in self.parts():
            path = directory / f"{part.name}.safetensors"
            if not path.is_file():
                continue
            tensors = checkpoint.load_tensors(path, meta["sha256"].get(path.name))
            _check_tensors(path, tensors, part.module.state_dict())
            mismatch = checkpoint.state_dict_mismatch(part.module.state_dict(), tensors)
            if mismatch is not None:
                raise DiffkitError(f"the {part.name} in {path} does not fit the one its spec describes: {mismatch}")
            try:
                part.module.load_state_dict(tensors)
            except RuntimeError as exc:
                first = str(exc).splitlines()[0]
                raise DiffkitError(f"the {part.name} in {path} does not fit the one its spec describes ({first})") from None
            part.module.eval()
            # runs of 0.1 kept a part's record at the top level of meta.json, under its name
            info = (meta.get("parts") or {}).get(part.name, meta.get(part.name))
            part.load_info(info if isinstance(info, Mapping) else {} if info is None else {"steps_trained": info})

    def check_picture(self, n: int, asked: str = "--n, times the number of labels") -> None:
        """Refuse a picture of more samples than :data:`PICTURE_LIMITS` allows, before they
        are drawn; ``asked`` names the setting that asked for them."""
        kind = self.context.data_kind
        limit = PICTURE_LIMITS.get(kind, PICTURE_LIMITS["images"])
        if n > limit:
            raise DiffkitError(
                f"a picture shows at most {limit:,} samples of {kind} and {n:,} were asked for ({asked}); ask for fewer,"
                " or write the samples to a .npy file, which is streamed to disk batch by batch for any number"
            )

    def check_forward(self, n: int, frames: int) -> None:
        """Refuse a picture of the forward process larger than :data:`FORWARD_LIMITS` allows."""
        if n < 1 or frames < 2:
            raise DiffkitError(f"the forward process needs at least 1 example and 2 frames, got {n} and {frames}")
        key = "points" if self.context.data_kind == "points" else "examples"
        if n > FORWARD_LIMITS[key]:
            raise DiffkitError(
                f"a picture of the forward process shows at most {FORWARD_LIMITS[key]:,} {key}, and {n:,} were asked"
                " for (--n); ask for fewer"
            )
        if frames > FORWARD_LIMITS["frames"]:
            raise DiffkitError(
                f"a picture of the forward process shows at most {FORWARD_LIMITS['frames']} timesteps, and {frames:,}"
                " were asked for (--frames); ask for fewer"
            )

    def picture(self, samples: Tensor, path: str | Path, title: str | None = None) -> Path:
        """Write ``samples`` (in data coordinates) as a PNG: a grid of images, or a scatter
        of points beside as many points of the training data."""
        from diffkit import plotting

        self.check_picture(samples.shape[0])
        if self.context.data_kind == "images":
            return plotting.image_grid(samples, path)
        data = self.reference_data()
        reference = data[0][: samples.shape[0]] if data is not None else None  # points: the training data
        if title is None:
            name = (self._data_config or {}).get("type", "data")
            title = f"{name}: {type(self.sampler).__name__} samples"
        return plotting.scatter(samples, path, reference=reference, title=title)

    def to(self, device: str | torch.device) -> Pipeline:
        device = resolve_device(device)
        self.denoiser.to(device)
        if self._online is not None:
            self._online.to(device)
        for part in self.parts():
            part.module.to(device)
        return self

    def __repr__(self) -> str:
        params = sum(p.numel() for p in self.denoiser.parameters())
        return (
            f"Pipeline({self.schedule!r}, denoiser={type(self.denoiser).__name__} ({params:,} parameters),"
            f" objective={type(self.objective).__name__}, sampler={type(self.sampler).__name__},"
            f" sample_shape={self.context.sample_shape}, steps_trained={self.steps_trained})"
        )


DIAMETER_SAMPLES = 2048


class _PerThread(threading.local):
    """State of the last sampling call, one per thread, so that threads sampling from one
    pipeline at once do not see each other's; a copy of the pipeline starts without any."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _PerThread:
        return _PerThread()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_PerThread, ())


def data_diameter(dataset: Dataset, limit: int = DIAMETER_SAMPLES) -> float | None:
    """The largest distance between two training samples in model space (point data
    standardised per coordinate, as the pipeline trains on it): what a ``ve`` process takes
    as σ_max (Song & Ermon 2020, Technique 1). Computed on at most ``limit`` samples spread
    evenly over the dataset; ``None`` for an empty one."""
    n = len(dataset)
    if n < 2:
        return None
    tensors = dataset.tensors()
    idx = torch.linspace(0, n - 1, min(n, limit)).round().long()
    if tensors is not None:
        x = tensors[0].double()
        if dataset.kind == "points":
            x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
        x = x[idx]
    else:
        x = torch.stack([dataset[int(i)][0] for i in idx]).double()
    flat = x.reshape(x.shape[0], -1)
    return float(torch.cdist(flat, flat).max())

def write_npy(path: str | Path, batches: Iterable[Tensor], n: int, sample_shape: tuple[int, ...]) -> Path:
    """Write ``n`` samples, given batch by batch, to a ``.npy`` file of float32 ``[n,
    *sample_shape]``: each batch goes straight into a memory-mapped file (so memory holds
    one batch whatever ``n``), written atomically (the file appears only once whole).
    Refused before anything is written where the disk lacks the room."""
    import shutil

    import numpy as np

    path = Path(path)
    shape = (n, *sample_shape)
    nbytes = 4 * math.prod(shape)
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise DiffkitError(
            f"{path} would take {memory.format_bytes(nbytes)} ({n:,} samples of shape {tuple(sample_shape)}) and its disk"
            f" has {memory.format_bytes(free)} free; ask for fewer samples, or write to another disk"
        )

    def write(tmp: Path) -> None:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        start = 0
        for x in batches:
            if start + x.shape[0] > n or tuple(x.shape[1:]) != tuple(sample_shape):
                raise DiffkitError(f"a batch of shape {tuple(x.shape)} does not fit {n} samples of shape {tuple(sample_shape)}")
            array[start : start + x.shape[0]] = x.numpy()
            start += x.shape[0]
        if start != n:
            raise DiffkitError(f"{start} samples were drawn for the {n} of {path}")
        array.flush()
        del array

    return checkpoint.atomic_write(path, write)


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of a run directory, its fields checked: each problem is one message
    naming the file and the field. Runs saved before weights had checksums (no
    ``sha256``) read as having none to verify."""
    meta = checkpoint.read_json(path)
    if not isinstance(meta, dict):
        raise DiffkitError(
            f"{path} holds {_json_kind(meta)} where a JSON object of the run's metadata is expected; the file is"
            " damaged: restore it, or save the run again"
        )

    def bad(field: str, expected: str) -> DiffkitError:
        got = "missing" if field not in meta else f"{_json_kind(meta[field])} ({json.dumps(meta[field])[:60]})"
        return DiffkitError(f"{path}: {field} must be {expected}, got {got}; the file is damaged: restore it, or save the run again")

    def count(v: Any, least: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    shape = meta.get("sample_shape")
    if not isinstance(shape, list) or not all(count(d, 1) for d in shape):
        raise bad("sample_shape", "a list of positive integers (the shape of one sample)")
    if meta.get("num_classes") is not None and not count(meta["num_classes"], 0):
        raise bad("num_classes", "an integer of at least 0, or null")
    if meta.get("data_kind", "points") not in ("points", "images"):
        raise bad("data_kind", "'points' or 'images'")
    if not count(meta.get("steps_trained", 0), 0):
        raise bad("steps_trained", "an integer of at least 0")
    parts = meta.get("parts")
    if parts is not None and (not isinstance(parts, dict) or not all(isinstance(v, dict) for v in parts.values())):
        raise bad("parts", "an object of the components' records (each an object)")
    diameter = meta.get("data_diameter")
    if diameter is not None and not (
        isinstance(diameter, (int, float)) and not isinstance(diameter, bool) and math.isfinite(diameter) and diameter > 0
    ):
        raise bad("data_diameter", "a positive number, or null")
    sums = {} if meta.get("sha256") is None else meta["sha256"]
    if not isinstance(sums, dict) or not all(
        isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in sums.values()
    ):
        raise bad("sha256", "an object of file names and their SHA-256 (64 hex digits)")
    meta["sha256"] = sums
    return meta


LABEL_TENSORS = ("data.reference_labels",)
"""Saved tensors that hold integer labels, not weights."""


def _check_tensors(path: Path, tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """Refuse tensors that cannot be weights diffkit saved: integers or booleans where the
    network (``expected``, by name) has floating-point values, or NaN or infinite values."""
    for key, t in tensors.items():
        want = expected.get(key)
        if not t.is_floating_point():
            if key in LABEL_TENSORS:
                continue
            if want is None or want.is_floating_point():
                wanted = want.dtype if want is not None else "floating-point"
                raise DiffkitError(
                    f"{path}: tensor '{key}' is {t.dtype} where {wanted} values are expected; the file was not written"
                    " by diffkit or is damaged: restore it, or train the run again"
                )
        elif not bool(torch.isfinite(t).all()):
            raise DiffkitError(
                f"{path}: tensor '{key}' holds NaN or infinite values, so every sample would be NaN; the file is damaged"
                " or the training diverged: restore it, or train the run again (a lower train.lr)"
            )


def _standardisation(path: Path, tensors: Mapping[str, Tensor], shape: tuple[int, ...]) -> tuple[Tensor | None, Tensor | None]:
    """``data.mean`` and ``data.std`` of a saved run, checked: both or neither, each of
    one sample's shape, the std positive (NaN and infinity are refused before)."""
    mean, std = tensors.get("data.mean"), tensors.get("data.std")
    if mean is None and std is None:
        return None, None
    for name, t in (("data.mean", mean), ("data.std", std)):
        if t is None:
            other = "data.std" if name == "data.mean" else "data.mean"
            raise DiffkitError(f"{path} has {other} but no {name}; the file is damaged: restore it, or train the run again")
        if tuple(t.shape) != tuple(shape):
            raise DiffkitError(
                f"{path}: {name} has shape {tuple(t.shape)} but one sample of this run has shape {tuple(shape)}"
                f" (sample_shape in {META_FILE}); the file is damaged: restore it, or train the run again"
            )
    assert std is not None
    if not bool((std > 0).all()):
        raise DiffkitError(
            f"{path}: data.std has a value of 0 or less, which cannot standardise data; the file is damaged: restore it,"
            " or train the run again"
        )
    return mean, std


def _spec_changes(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Where two specs (as plain data) differ: ``(dotted path, old value, new value)``."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in [*old, *(k for k in new if k not in old)]:
            where = f"{path}.{key}" if path else str(key)
            if key not in old and _is_default(where, new[key]) or key not in new and _is_default(where, old[key]):
                continue  # a setting one side does not know yet, at its default: no change
            out += _spec_changes(old.get(key), new.get(key), where)
        return out
    return [] if old == new else [(path, old, new)]


def _is_default(path: str, value: Any) -> bool:
    """Whether ``value`` is the default of the ``train`` or ``sample`` setting at ``path``."""
    defaults = {"train": TrainConfig().model_dump(mode="json"), "sample": SampleConfig().model_dump(mode="json")}
    node: Any = defaults
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return node == value


def _check_resumable(
    found: TrainingCheckpoint, spec: dict[str, Any] | None, dist: DistContext, allow: bool, steps: int, registry: Registry
) -> None:
    """Refuse to resume from ``found`` with a spec or a number of processes it was not written
    for, or with fewer steps than it has already trained."""
    saved = found.state
    if steps < found.step:
        raise DiffkitError(
            f"{found.name} has trained {found.step} steps already, more than the {steps} asked for; resume with"
            f" steps of at least {found.step}"
        )
    if saved["train"]["world_size"] != dist.world_size:
        raise DiffkitError(
            f"{found.name} was written by a run of {saved['train']['world_size']} processes and this one has"
            f" {dist.world_size}; resume with the same number of processes (torchrun --nproc_per_node)"
        )
    if spec is None or saved.get("spec") is None:
        return
    changes = _spec_changes(complete_saved_spec(saved["spec"], registry), spec)
    if not changes:
        return

    def show(items: list[tuple[str, Any, Any]]) -> str:
        return "; ".join(f"{p}: {a!r} → {b!r}" for p, a, b in items)

    fixed = [c for c in changes if any(c[0] == f or c[0].startswith(f + ".") for f in FIXED_ON_RESUME)]
    if fixed:
        raise DiffkitError(
            f"the spec differs from the one {found.name} was trained with in what a resumed run cannot change:"
            f" {show(fixed)}. Put it back, or start a new run in another directory"
        )
    if not allow:
        raise DiffkitError(
            f"the spec differs from the one {found.name} was trained with: {show(changes)}. Put it back, or pass"
            " --allow-spec-change (fit(allow_spec_change=True)) to resume with these changes"
        )
