"""A label-free guidance, written as a plugin author would from docs/guidance.md: it steers
unlabelled samples toward a box by the gradient of r(x̂_0) = −10·(distance to the box)²."""
import torch
from pydantic import Field

from diffkit import Component, hookimpl
from diffkit.guidance import GuidanceParams, RewardGuidance

DIFFKIT_API_VERSION = 2


class TowardBoxParams(GuidanceParams):
    low: list[float] = Field([1.2, -0.6], description="The box's lower corner, in the data's coordinates.")
    high: list[float] = Field([2.2, 0.2], description="The box's upper corner.")


def toward_box(params, ctx):
    lo, hi = torch.tensor(params.low), torch.tensor(params.high)

    def reward(x):
        return -((lo.to(x) - x).clamp_min(0).square() + (x - hi.to(x)).clamp_min(0).square()).sum(-1) * 10

    return RewardGuidance(params, reward)


@hookimpl
def diffkit_guidance():
    return [Component("toward-box", toward_box, TowardBoxParams, "Steers samples into a box (no labels).")]
