"""The guidance methods: ``classifier``, ``classifier-free`` and ``autoguidance``.

Each is a component of kind ``guidance``, chosen by a spec's top-level ``guidance:``
section and applied by :func:`diffkit.guidance.guide` to the model's prediction before
any sampler sees it; each takes the options every method takes (``scale``, ``rescale``,
``interval``, ``interval_in``, ``schedule``: :class:`diffkit.guidance.GuidanceParams`)::

    sampler: {type: heun, steps: 18}
    guidance: {type: classifier-free, scale: 2.0, interval: [0.3, 5.0]}

- ``classifier`` (Dhariwal & Nichol 2021, Alg. 2, Eq. 14): ε̃ = ε̂(x_t) − γ σ_t ∇ log p_φ(y | x_t, t),
  with a noise-aware classifier that the pipeline trains after the denoiser (a stateful
  part, saved as ``classifier.safetensors``); the score form ∇ log p̃ = ∇ log p + γ ∇ log p_φ
  guides every sampler alike. With an exact classifier and an unconditional model, γ = 1
  samples p(x | y).
- ``classifier-free`` (Ho & Salimans 2022, Eq. 6): ε̃ = (1 + w) ε(x_t, y) − w ε(x_t, ∅), from
  one denoiser trained with and without labels. w = 0 is the conditional model; libraries
  that write ε(x_t, ∅) + s (ε(x_t, y) − ε(x_t, ∅)) (Imagen, diffusers' ``guidance_scale``) use s = 1 + w.
  ε(x_t, y) − ε(x_t, ∅) = −σ_t ∇ log p(y | x_t) for the classifier the network implies, so
  classifier-free guidance at w is classifier guidance of the unconditional model at 1 + w.
- ``autoguidance`` (Karras et al. 2024, Eq. 1): ε̃ = ε_1 + w (ε_1 − ε_0), ε_1 the model and
  ε_0 a weaker model of the same task, the guide: an earlier checkpoint of the same run
  (``guide_step``, copied into the run as ``guide.safetensors`` at training) or another run
  directory (``guide_run``). Their D_w = D_0 + w'(D_1 − D_0) is this with w' = 1 + w. It
  needs no labels: with labels both models are asked for them.

The 0.1 form ``sampler: {type: guided, base: …, guidance: …}`` is read as the base sampler
plus a top-level ``guidance`` section, with a one-line notice.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffkit_plugins.classifiers import ClassifierResult, classifier_logits, noisy_classifier, train_classifier
from pydantic import Field, model_validator
from torch import Tensor, nn

from diffkit import BuildContext, Component, hookimpl
from diffkit.errors import DiffkitError
from diffkit.guidance import GuidanceMethod, GuidanceParams, GuidedModel, RewardGuidance, upgrade_guided_sampler
from diffkit.interfaces import TensorData
from diffkit.spec import TrainConfig, register_upgrade

__all__ = [
    "ClassifierGuidance",
    "ClassifierGuidanceParams",
    "ClassifierPart",
    "ClassifierFreeGuidance",
    "ClassifierFreeParams",
    "AutoGuidance",
    "AutoGuidanceParams",
    "GuidePart",
    "class_log_prob_grad",
    "RewardGuidance",
]

CLASSIFIER_SCALE = 4.0
CFG_SCALE = 1.0
AUTOGUIDANCE_SCALE = 1.0
HELD_OUT_FRACTION = 0.1
"""Share of the training data kept out of the classifier's training to measure its accuracy by t."""
CLASSIFIER_METRICS_FILE = "classifier_metrics.jsonl"

register_upgrade(upgrade_guided_sampler)


# -- classifier guidance ----------------------------------------------------------------------
class ClassifierGuidanceParams(GuidanceParams):
    """Classifier guidance with a noise-aware classifier p_φ(y | x_t, t) trained by `diffkit train`."""

    scale: float = Field(
        CLASSIFIER_SCALE,
        ge=0,
        le=1000,
        description="γ, the inverse temperature of p_φ(y | x_t)^γ (Dhariwal & Nichol 2021's s): 0 samples"
        " without guidance, 1 the posterior p(x | y) for an exact classifier, more trades diversity for fidelity.",
    )
    width: int = Field(
        64, ge=4, le=4096, description="Hidden width of the classifier (points) or channels of its first level (images)."
    )
    depth: int = Field(
        2,
        ge=1,
        le=16,
        description="Residual blocks of the classifier (points) or resolution levels of its encoder, each halving"
        " the image (images).",
    )
    train_steps: int | None = Field(
        None, ge=1, description="Optimiser steps of the classifier's training; null takes the spec's train.steps."
    )
    lr: float | None = Field(None, gt=0, le=1, description="AdamW learning rate of the classifier; null takes train.lr.")
    batch_size: int | None = Field(
        None, ge=1, description="Examples per step of the classifier's training; null takes train.batch_size."
    )


def class_log_prob_grad(logits_fn: Any, x_t: Tensor, y: Tensor) -> Tensor:
    """∇_{x_t} log p(y | x_t) by autograd of ``logits_fn(x) -> [batch, classes]``, per sample;
    zero where ``y < 0`` (no label).

    Only x_t is differentiated: no gradient reaches any weights. Works inside
    ``torch.inference_mode()``: the inputs are cloned into ordinary tensors in a region
    where autograd is on."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x_t.detach().clone().requires_grad_(True)
        y = y.to(x_t.device).clone()
        log_p = torch.log_softmax(logits_fn(x).double(), dim=-1)
        chosen = log_p.gather(1, y.clamp_min(0)[:, None]).squeeze(1) * (y >= 0)
        (grad,) = torch.autograd.grad(chosen.sum(), x)
    return grad.detach().to(x_t.dtype)


class ClassifierPart:
    """The noise-aware classifier as a stateful part: trained after the denoiser on noised
    training data (cross-entropy, t drawn as the process draws it; Dhariwal & Nichol 2021,
    Sec. 4), with a held-out share of the data to report its accuracy by t."""

    name = "classifier"

    def __init__(self, module: nn.Module, training: Mapping[str, Any]) -> None:
        self.module = module
        self.training = dict(training)
        self.steps_trained = 0
        self.accuracy: list[dict[str, Any]] | None = None

    def fit(self, pipeline: Any, dataset: Any, config: TrainConfig, device: torch.device, out: Any, progress: bool) -> ClassifierResult:
        if not dataset.num_classes:
            raise DiffkitError("classifier guidance needs labelled data to train its classifier on; this data has no labels")
        config = TrainConfig.model_validate({**config.model_dump(), **self.training})
        train_data, held_out = _hold_out(dataset, HELD_OUT_FRACTION, pipeline.seed)
        metrics = None
        if out is not None:
            metrics = Path(out) / CLASSIFIER_METRICS_FILE
            if self.steps_trained == 0:
                metrics.unlink(missing_ok=True)
        result = train_classifier(
            self.module,
            pipeline.schedule,
            train_data,
            config,
            seed=pipeline.seed + 1 + self.steps_trained,
            device=device,
            transform=pipeline.normalizer(),
            held_out=held_out,
            metrics_path=metrics,
            progress=progress,
            start_step=self.steps_trained,
        )
        self.steps_trained += result.steps
        self.accuracy = result.accuracy
        return result

    def info(self) -> dict[str, Any]:
        return {"steps_trained": self.steps_trained, "accuracy_by_t": self.accuracy}

    def load_info(self, info: Mapping[str, Any]) -> None:
        steps, accuracy = info.get("steps_trained"), info.get("accuracy_by_t")
        if not (steps is None or (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0)) or not isinstance(
            accuracy or [], list
        ):
            raise DiffkitError(
                "the run's record of its classifier must be an object with steps_trained (an integer) and accuracy_by_t"
                " (a list); meta.json is damaged: restore it, or save the run again"
            )
        self.steps_trained = int(steps or 1)
        self.accuracy = accuracy


class ClassifierGuidance(GuidanceMethod):
    """ε̃(x_t) = ε̂(x_t, y) − γ σ_t ∇_{x_t} log p_φ(y | x_t, t)  (Dhariwal & Nichol 2021, Alg. 2, Eq. 14).

    With the ancestral sampler the mean of each step moves by (β_t/√α_t) γ ∇ log p_φ, which
    is Alg. 1's shift Σ γ ∇ log p_φ with Σ = β_t (to first order in β_t)."""

    requires_conditional_denoiser = False

    def __init__(self, params: ClassifierGuidanceParams, classifier: nn.Module) -> None:
        super().__init__(params)
        training = {"steps": params.train_steps, "lr": params.lr, "batch_size": params.batch_size}
        self.part = ClassifierPart(classifier, {k: v for k, v in training.items() if v is not None})

    @property
    def classifier(self) -> nn.Module:
        return self.part.module

    def parts(self) -> list[Any]:
        return [self.part]

    def logits(self, process: Any, x_t: Tensor, t: Tensor) -> Tensor:
        """log p_φ(· | x_t, t) up to a constant (replaceable: the exact classifier of a test)."""
        return classifier_logits(self.part.module, process, x_t, t)

    def terms(self, model: GuidedModel, x_t: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        eps = model.predict(x_t, t, cond)
        if cond is None:
            return eps, torch.zeros_like(eps)
        grad = class_log_prob_grad(lambda x: self.logits(model.process, x, t), x_t, cond)
        _, sigma = model.process.coefficients(t, x_t)
        return eps, -(grad * sigma.to(x_t.dtype))  # Δ = −σ_t ∇ log p_φ(y | x_t)


def classifier(params: ClassifierGuidanceParams, ctx: BuildContext) -> ClassifierGuidance:
    if not ctx.sample_shape:
        raise ValueError("classifier guidance needs the data's sample shape to build its classifier")
    if not ctx.num_classes:
        raise ValueError(
            "classifier guidance needs labelled data to train its classifier on, and this data has no labels;"
            " use a labelled dataset (e.g. gaussians, digits)"
        )
    net = noisy_classifier(tuple(ctx.sample_shape), ctx.num_classes, params.width, params.depth, ctx.data_kind)
    return ClassifierGuidance(params, net)


def _hold_out(dataset: Any, fraction: float, seed: int) -> tuple[Any, tuple[Tensor, Tensor] | None]:
    """Split in-memory data into what the classifier trains on and a held-out share (at
    least one example, at most 2,000) to measure it on; other data is not split."""
    tensors = dataset.tensors()
    if tensors is None or len(dataset) < 20:
        return dataset, None
    x, y = tensors
    k = min(2000, max(1, round(fraction * len(dataset))))
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    rest, held = perm[k:], perm[:k]
    train = TensorData(x[rest], y[rest], num_classes=dataset.num_classes, kind=dataset.kind)
    return train, (x[held], y[held])


# -- classifier-free guidance -----------------------------------------------------------------
class ClassifierFreeParams(GuidanceParams):
    """Classifier-free guidance from one denoiser trained with and without labels."""

    scale: float = Field(
        CFG_SCALE,
        ge=0,
        le=1000,
        description="w of Ho & Salimans 2022, Eq. 6: ε̃ = (1 + w) ε(x, y) − w ε(x, ∅). 0 is the conditional model;"
        " the 'guidance_scale' s of libraries that write ε(x, ∅) + s (ε(x, y) − ε(x, ∅)) is 1 + w.",
    )


class ClassifierFreeGuidance(GuidanceMethod):
    """ε̃ = ε(x_t, y) + w (ε(x_t, y) − ε(x_t, ∅))  (Ho & Salimans 2022, Eq. 6).

    Both predictions come from one forward pass of a doubled batch; rows without a label
    get Δ = 0 (they are left unguided)."""

    requires_conditional_denoiser = True

    def terms(self, model: GuidedModel, x_t: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        if cond is None:
            eps = model.predict(x_t, t, None)
            return eps, torch.zeros_like(eps)
        tt = t if t.ndim else t.expand(x_t.shape[0])
        both = model.predict(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([cond, torch.full_like(cond, -1)]).to(x_t.device))
        eps_y, eps_null = both.chunk(2)
        return eps_y, eps_y - eps_null


def _check_cfg(params: ClassifierFreeParams, spec: Any) -> list[str]:
    if getattr(spec.denoiser, "num_classes", None) is None:
        return [
            "classifier-free guidance needs a denoiser trained with and without labels: set denoiser.num_classes"
            " to the number of classes in the data (labels are dropped at rate train.cond_drop_prob)"
        ]
    return []


# -- autoguidance -----------------------------------------------------------------------------
class AutoGuidanceParams(GuidanceParams):
    """Autoguidance: guide the model with a weaker model of the same task (Karras et al. 2024)."""

    scale: float = Field(
        AUTOGUIDANCE_SCALE,
        ge=0,
        le=1000,
        description="w of ε̃ = ε_1 + w (ε_1 − ε_0), ε_0 the guide; Karras et al.'s guidance weight is 1 + w.",
    )
    guide_step: int | None = Field(
        None,
        ge=1,
        description="The guide is this run's checkpoint of this step (its EMA weights), copied into the run at"
        " training; keep it with train.checkpoint_every dividing it and train.keep_checkpoints large enough.",
    )
    guide_run: str | None = Field(
        None,
        description="The guide is the denoiser of this other run directory (same data, process and objective),"
        " read when the run is sampled.",
    )

    @model_validator(mode="after")
    def _one_guide(self) -> AutoGuidanceParams:
        if (self.guide_step is None) == (self.guide_run is None):
            raise ValueError("name the guide by one of guide_step (a checkpoint of this run) or guide_run (a run directory)")
        return self


class GuidePart:
    """The guide of autoguidance taken from a checkpoint of the same run: a copy of the
    denoiser's architecture whose weights are the EMA weights of checkpoint ``step``."""

    name = "guide"

    def __init__(self, step: int) -> None:
        self.step = step
        self.module: nn.Module = nn.Module()
        self.steps_trained = 0

    def attach(self, pipeline: Any) -> None:
        self.module = copy.deepcopy(pipeline.denoiser).eval()

    def fit(self, pipeline: Any, dataset: Any, config: Any, device: torch.device, out: Any, progress: bool) -> str:
        from diffkit.checkpoint import CheckpointDir

        if out is None:
            raise DiffkitError(
                f"autoguidance's guide_step: {self.step} is a checkpoint of the run, so the training needs a run"
                " directory (diffkit train --out, or fit(out=...))"
            )
        checkpoints = CheckpointDir(Path(out) / "checkpoints", keep=sys.maxsize)
        if self.step not in checkpoints.steps():
            kept = ", ".join(map(str, sorted(checkpoints.steps()))) or "none"
            raise DiffkitError(
                f"autoguidance's guide_step: {self.step} names no checkpoint of {out} (it holds steps: {kept}); set"
                " train.checkpoint_every to divide it and train.keep_checkpoints to keep it, or name another step"
            )
        tensors = checkpoints.read(self.step).tensors
        self.module.load_state_dict({k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")})
        self.module.to(device).eval()
        self.steps_trained = self.step
        return f"autoguidance: the guide is the EMA weights of step {self.step}"

    def info(self) -> dict[str, Any]:
        return {"steps_trained": self.steps_trained}

    def load_info(self, info: Mapping[str, Any]) -> None:
        steps = info.get("steps_trained")
        if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0):
            raise DiffkitError("the run's record of its guide must hold steps_trained (an integer); meta.json is damaged")
        self.steps_trained = steps


class AutoGuidance(GuidanceMethod):
    """ε̃ = ε_1(x_t) + w (ε_1(x_t) − ε_0(x_t))  (Karras et al. 2024, Eq. 1 with their w = 1 + w).

    With the guide equal to the model, Δ = 0 and nothing changes."""

    needs_labels = False

    def __init__(self, params: AutoGuidanceParams) -> None:
        super().__init__(params)
        self.part = GuidePart(params.guide_step) if params.guide_step is not None else None
        self._guide_pipeline: Any = None

    def parts(self) -> list[Any]:
        return [self.part] if self.part is not None else []

    def guide_network(self, model: GuidedModel) -> Any:
        """The guide's prediction ``predict(x_t, t, cond)``."""
        if self.part is not None:
            if model.with_network is None:
                raise DiffkitError("autoguidance needs the pipeline's model to run its guide network")
            return model.with_network(self.part.module)
        run = self.params.guide_run
        if self._guide_pipeline is None:
            from diffkit.pipeline import Pipeline

            if not Path(str(run)).is_dir():
                raise DiffkitError(f"autoguidance's guide_run {run} is not a run directory; train the guide run first")
            self._guide_pipeline = Pipeline.load(str(run))
        pipe = self._guide_pipeline
        if pipe.schedule.describe() != model.process.describe():
            raise DiffkitError(
                f"autoguidance's guide run {run} has another process ({pipe.schedule.describe()}) than this model"
                f" ({model.process.describe()}); guide with a run of the same process"
            )
        return pipe.conditional_predictor()

    def terms(self, model: GuidedModel, x_t: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        eps = model.predict(x_t, t, cond)
        guide = self.guide_network(model)
        return eps, eps - guide(x_t, t, cond)

    def check_ready(self, scale: float) -> str | None:
        if self.part is not None and scale != 0 and self.part.steps_trained == 0:
            return (
                "autoguidance needs its guide, and this model has none: train with this guidance in the spec so that"
                " fit() copies the checkpoint it names into the run (guide.safetensors)"
            )
        return None


@hookimpl
def diffkit_guidance() -> list[Component]:
    return [
        Component(
            "classifier",
            classifier,
            ClassifierGuidanceParams,
            "Classifier guidance: adds γ ∇ log p_φ(y | x_t) of a noise-aware classifier to the score"
            " (Dhariwal & Nichol 2021).",
        ),
        Component(
            "classifier-free",
            lambda p, ctx: ClassifierFreeGuidance(p),
            ClassifierFreeParams,
            "Classifier-free guidance: (1 + w) ε(x, y) − w ε(x, ∅) from one conditional denoiser (Ho & Salimans 2022).",
            check=_check_cfg,
        ),
        Component(
            "autoguidance",
            lambda p, ctx: AutoGuidance(p),
            AutoGuidanceParams,
            "Autoguidance: ε_1 + w (ε_1 − ε_0) with a weaker guide ε_0, an earlier checkpoint or another run"
            " (Karras et al. 2024).",
        ),
    ]
