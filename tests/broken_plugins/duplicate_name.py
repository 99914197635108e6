"""A plugin whose schedule takes the name of a built-in one ('linear'), with other numbers."""
import torch

from diffkit import Component, Params, Schedule, hookimpl

DIFFKIT_API_VERSION = 2


@hookimpl
def diffkit_schedules():
    betas = torch.linspace(1e-3, 0.05, 100, dtype=torch.float64)
    return [Component("linear", lambda p, ctx: Schedule.from_betas(betas), Params, "Another linear schedule.")]
