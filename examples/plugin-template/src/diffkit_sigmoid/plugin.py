"""The hooks diffkit calls: each returns the components of one kind this plugin provides."""

from __future__ import annotations

from diffkit import Component, hookimpl

from diffkit_sigmoid.sampler import ReverseSDEParams, reverse_sde
from diffkit_sigmoid.schedule import SigmoidParams, sigmoid

DIFFKIT_API_VERSION = 2
"""The diffkit plugin API this plugin is written for (``diffkit.API_VERSION``)."""


@hookimpl
def diffkit_schedules() -> list[Component]:
    return [Component("sigmoid", sigmoid, SigmoidParams, "Sigmoid ᾱ schedule (Chen 2023, Alg. 1).")]


@hookimpl
def diffkit_samplers() -> list[Component]:
    return [
        Component(
            "reverse-sde",
            reverse_sde,
            ReverseSDEParams,
            "Euler–Maruyama steps of the reverse-time VP SDE (Song et al. 2021, Eq. 6 and 11).",
        )
    ]
