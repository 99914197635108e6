"""A schedule hook whose name is misspelt (diffkit_schedule, not diffkit_schedules)."""
import torch

from diffkit import Component, Params, Schedule, hookimpl

DIFFKIT_API_VERSION = 2


@hookimpl
def diffkit_schedule():
    betas = torch.full((10,), 0.1, dtype=torch.float64)
    return [Component("ten-steps", lambda p, ctx: Schedule.from_betas(betas), Params, "Ten steps.")]
