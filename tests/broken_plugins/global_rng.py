"""An ancestral sampler that draws its noise from torch's global generator, not the loop's."""
import torch

from diffkit import Component, StepSamplerBase, hookimpl
from diffkit.sampling import steps_field
from diffkit import Params

DIFFKIT_API_VERSION = 2


class GlobalParams(Params):
    steps: int | None = steps_field(None)


class GlobalNoiseDDPM(StepSamplerBase):
    """DDPM's ancestral step (Ho et al. 2020, Alg. 2), its noise drawn with torch.randn."""

    name = "global-ddpm"

    def step(self, x, ctx):
        d = ctx.denoise(x)
        if ctx.last:
            return d.x0
        a_t, s_t, a_s, s_s = ctx.ends()
        # DDIM with η = 1, i.e. DDPM's posterior (Song et al. 2021, Eq. 12 and 16)
        var = s_s**2 * (1 - (a_t * s_s / (a_s * s_t)) ** 2)
        mean = a_s * d.x0 + max(s_s**2 - var, 0.0) ** 0.5 * d.eps
        return mean + var**0.5 * torch.randn(x.shape, dtype=x.dtype)  # the planted bug


@hookimpl
def diffkit_samplers():
    return [Component("global-ddpm", lambda p, ctx: GlobalNoiseDDPM(p), GlobalParams, "Noise from the global RNG.")]
