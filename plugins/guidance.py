"""Guidance: the sampler ``guided`` and the guidance methods ``classifier`` and ``classifier-free``.

A guidance component wraps the model's noise prediction (see :class:`diffkit.Guidance`);
the ``guided`` sampler composes one with any other sampler, which it drives with the
wrapped prediction and which never knows it is guided::

    sampler:
      type: guided
      base: {type: ddim, steps: 100}            # or ddpm, dpm-solver, sgld, pc, …
      guidance: {type: classifier, scale: 3.0}

**The scale.** Both methods tilt the model's distribution by the classifier's
likelihood: the guided score is that of p_model(x_t) · p(y | x_t)^s, where the model
is unconditional for classifier guidance and conditional for classifier-free guidance.
Scale 0 is the model as trained: unguided samples, bit for bit.

- ``classifier`` (Dhariwal & Nichol 2021, Alg. 1–2): s is their γ; ε̃ = ε̂ − γ σ_t ∇ log p_φ(y | x_t).
  With an exact classifier and an unconditional model, γ = 1 samples p(x | y).
- ``classifier-free`` (Ho & Salimans 2022, Eq. 6): s is their w;
  ε̃ = (1 + w) ε(x_t, y) − w ε(x_t, ∅) = ε(x_t, y) + w (ε(x_t, y) − ε(x_t, ∅)).
  w = 0 is the conditional model. Libraries that write ε(x_t, ∅) + s (ε(x_t, y) − ε(x_t, ∅))
  (Imagen, Stable Diffusion, diffusers' ``guidance_scale``) use s = 1 + w.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from diffkit import BuildContext, Component, Params, Predict, Schedule, StepCallback, hookimpl
from diffkit import diffusion as D
from diffkit.interfaces import CondPredict, Guidance, LabelledPredict, Sampler
from diffkit.spec import ComponentSection, build_section
from diffkit_plugins.classifiers import noisy_classifier

__all__ = [
    "GuidedSampler",
    "GuidedParams",
    "ClassifierGuidance",
    "ClassifierGuidanceParams",
    "ClassifierFreeGuidance",
    "ClassifierFreeParams",
    "class_log_prob_grad",
]

CLASSIFIER_SCALE = 4.0
CFG_SCALE = 1.0


# -- the guided sampler ------------------------------------------------------------------------
class GuidedParams(Params):
    """Any sampler, steered toward the asked labels by a guidance component."""

    base: ComponentSection["sampler"] = Field(
        {"type": "ddpm"},
        description="The sampler that runs the reverse process, as a sampler section ({type: ddim, steps: 100},"
        " ddpm, sgld, pc, …); it is driven by the guided noise prediction and never knows it is guided.",
    )
    guidance: ComponentSection["guidance"] = Field(
        ...,
        description="How to steer toward the asked labels, as a guidance section:"
        " {type: classifier, scale: …} or {type: classifier-free, scale: …}.",
    )


class GuidedSampler:
    """Runs ``base`` on ``guidance.wrap(...)`` of the prediction it is handed.

    Given a :class:`~diffkit.interfaces.LabelledPredict` (the pipeline's, when labels
    are asked for), the base sampler is driven by the guided prediction; given a plain
    ``predict(x_t, t)`` (no labels), it runs unguided. Every other argument, ``steps``
    included, goes to the base unchanged.
    """

    def __init__(self, base: Sampler, guidance: Guidance) -> None:
        self.base = base
        self.guidance = guidance

    @property
    def clip_denoised(self) -> object:
        """The base sampler's bound on x̂_0 (diffkit.ClipDenoised), applied after guidance."""
        return getattr(self.base, "clip_denoised", "auto")

    def __call__(
        self,
        predict: Predict,
        schedule: Schedule,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
        callback: StepCallback | None = None,
        x_start: Tensor | None = None,
        t_start: int | None = None,
    ) -> Tensor:
        if isinstance(predict, LabelledPredict):
            guided = self.guidance.wrap(predict.given, schedule, predict.labels, scale=predict.guidance_scale)
            predict = predict.finish(guided)  # the core's bound on x̂_0 holds for the guided prediction
        return self.base(
            predict,
            schedule,
            shape,
            generator=generator,
            steps=steps,
            device=device,
            dtype=dtype,
            progress=progress,
            callback=callback,
            x_start=x_start,
            t_start=t_start,
        )

    # A base written as a step of the core's loop (plugin API 2) makes this one too: the
    # pipeline wraps the prediction with the guidance and runs the base's steps.
    @property
    def api(self) -> int:
        return getattr(self.base, "api", 1)

    @property
    def params(self) -> Any:
        return getattr(self.base, "params", None)

    @property
    def name(self) -> str:
        return f"guided {getattr(self.base, 'name', type(self.base).__name__.lower())}"

    @property
    def default_steps(self) -> int:
        return self.base.default_steps

    def levels(self, process: Any, steps: int, start: float | None = None) -> Tensor:
        return self.base.levels(process, steps, start)

    def step(self, x: Tensor, ctx: Any) -> Tensor:
        return self.base.step(x, ctx)

    def __repr__(self) -> str:
        return f"GuidedSampler(base={type(self.base).__name__}, guidance={type(self.guidance).__name__})"


def guided(params: GuidedParams, ctx: BuildContext) -> GuidedSampler:
    base = build_section("sampler", params.base, ctx, "sampler.base")
    guidance = build_section("guidance", params.guidance, ctx, "sampler.guidance")
    return GuidedSampler(base, guidance)


# -- classifier guidance ----------------------------------------------------------------------
class ClassifierGuidanceParams(Params):
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


def class_log_prob_grad(classifier: nn.Module, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """∇_{x_t} log p_φ(y | x_t, t) by autograd, per sample; zero where ``y < 0`` (no label).

    Only x_t is differentiated: no gradient reaches the classifier's (or any) weights.
    Works inside ``torch.inference_mode()``: the inputs are cloned into ordinary tensors
    in a region where autograd is on."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x_t.detach().clone().requires_grad_(True)
        t, y = t.clone(), y.to(x_t.device).clone()
        log_p = torch.log_softmax(classifier(x, t).double(), dim=-1)
        chosen = log_p.gather(1, y.clamp_min(0)[:, None]).squeeze(1) * (y >= 0)
        (grad,) = torch.autograd.grad(chosen.sum(), x)
    return grad.detach().to(x_t.dtype)


class ClassifierGuidance:
    """ε̃(x_t) = ε̂(x_t, y) − γ σ_t ∇_{x_t} log p_φ(y | x_t, t)  (Dhariwal & Nichol 2021, Alg. 2, Eq. 14).

    The score form of the same: ∇ log p̃(x_t) = ∇ log p(x_t) + γ ∇ log p_φ(y | x_t), so
    every sampler that reads the score from ε̂ (sgld, pc) is guided the same way. With
    the ancestral sampler the mean of each step moves by (β_t/√α_t) γ ∇ log p_φ, which
    is Alg. 1's shift Σ γ ∇ log p_φ with Σ = β_t (to first order in β_t).
    """

    requires_conditional_denoiser = False

    def __init__(self, params: ClassifierGuidanceParams, classifier: nn.Module) -> None:
        self.scale = params.scale
        self.classifier = classifier
        self.classifier_training: dict[str, Any] = {
            k: v
            for k, v in {"steps": params.train_steps, "lr": params.lr, "batch_size": params.batch_size}.items()
            if v is not None
        }

    def wrap(self, predict: CondPredict, schedule: Schedule, cond: Tensor, *, scale: float | None = None) -> Predict:
        gamma = self.scale if scale is None else float(scale)
        if gamma == 0:
            return lambda x_t, t: predict(x_t, t, cond)
        classifier = self.classifier

        def guided(x_t: Tensor, t: Tensor) -> Tensor:
            eps = predict(x_t, t, cond)
            grad = class_log_prob_grad(classifier, x_t, t, cond)
            _, sigma = schedule.coefficients(t, x_t)
            return eps - (gamma * grad) * sigma.to(x_t.dtype)  # ε̃ = ε̂ − σ_t γ ∇ log p(y | x_t)

        return guided


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


# -- classifier-free guidance -----------------------------------------------------------------
class ClassifierFreeParams(Params):
    """Classifier-free guidance from one denoiser trained with and without labels."""

    scale: float = Field(
        CFG_SCALE,
        ge=0,
        le=1000,
        description="w of Ho & Salimans 2022, Eq. 6: ε̃ = (1 + w) ε(x, y) − w ε(x, ∅). 0 is the conditional model;"
        " the 'guidance_scale' s of libraries that write ε(x, ∅) + s (ε(x, y) − ε(x, ∅)) is 1 + w.",
    )


class ClassifierFreeGuidance:
    """ε̃ = ε(x_t, y) + w (ε(x_t, y) − ε(x_t, ∅))  (Ho & Salimans 2022, Eq. 6).

    ε(x_t, y) − ε(x_t, ∅) = −σ_t ∇ log p(y | x_t) for the classifier implied by the
    network (Bayes' rule), so this is classifier guidance of the conditional model with
    γ = w, or of the unconditional model with γ = 1 + w. Both predictions come from one
    forward pass of a doubled batch; rows without a label are left unguided.
    """

    requires_conditional_denoiser = True

    def __init__(self, params: ClassifierFreeParams) -> None:
        self.scale = params.scale

    def wrap(self, predict: CondPredict, schedule: Schedule, cond: Tensor, *, scale: float | None = None) -> Predict:
        w = self.scale if scale is None else float(scale)
        if w == 0:
            return lambda x_t, t: predict(x_t, t, cond)
        both_labels = torch.cat([cond, torch.full_like(cond, -1)])

        def guided(x_t: Tensor, t: Tensor) -> Tensor:
            both = predict(torch.cat([x_t, x_t]), torch.cat([t, t]), both_labels.to(x_t.device))
            eps_y, eps_null = both.chunk(2)
            return torch.lerp(eps_null, eps_y, 1.0 + w)  # (1 + w) ε(x, y) − w ε(x, ∅)

        return guided


def _check_cfg(params: ClassifierFreeParams, spec: Any) -> list[str]:
    if getattr(spec.denoiser, "num_classes", None) is None:
        return [
            "classifier-free guidance needs a denoiser trained with and without labels: set denoiser.num_classes"
            " to the number of classes in the data (labels are dropped at rate train.cond_drop_prob)"
        ]
    return []


@hookimpl
def diffkit_samplers() -> list[Component]:
    return [
        Component(
            "guided",
            guided,
            GuidedParams,
            "A base sampler steered toward asked labels by a guidance component (classifier or classifier-free).",
        )
    ]


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
    ]
