"""diffkit: a plugin-extensible toolkit for diffusion models.

    >>> import diffkit
    >>> pipe = diffkit.Pipeline.from_spec("examples/moons.yaml")
    >>> pipe.fit()
    >>> x = pipe.sample(1000, seed=0)
"""

from diffkit.errors import ComponentLookupError, DiffkitError, PluginError, SpecError
from diffkit.hookspecs import API_VERSION, hookimpl
from diffkit.interfaces import (
    BuildContext,
    ClipDenoised,
    Dataset,
    Denoiser,
    Guidance,
    Objective,
    Predict,
    Sampler,
    Schedule,
    Spacing,
    StepCallback,
    TensorData,
    initial_state,
    report,
)
from diffkit.plugins import get_registry, load_plugins, set_registry
from diffkit.process import Process
from diffkit.registry import Component, Params, Registry, Seed
from diffkit.sampling import Denoised, StepContext, StepSamplerBase

__version__ = "0.1.0"


def build(kind: str, config: "str | dict", ctx: "BuildContext | None" = None, **params: object) -> object:
    """Build one registered component, e.g. ``diffkit.build("schedule", "cosine", timesteps=500)``.

    ``ctx`` tells the factory about the rest of the pipeline, as a spec's data would: a
    denoiser for 28×28 images is ``diffkit.build("denoiser", "unet",
    BuildContext(sample_shape=(1, 28, 28), data_kind="images"))``. Without it the factory
    gets ``BuildContext()``, which knows no data (a denoiser then refuses to build)."""
    if isinstance(config, str):
        config = {"type": config}
    if ctx is not None and not isinstance(ctx, BuildContext):
        raise TypeError(f"ctx must be a diffkit.BuildContext, got {type(ctx).__name__}")
    return get_registry().build(kind, {**config, **params}, ctx)


def __getattr__(name: str) -> object:
    # The pipeline pulls in training and plotting; import it only when asked for.
    if name == "Pipeline":
        from diffkit.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'diffkit' has no attribute {name!r}")


__all__ = [
    "API_VERSION",
    "BuildContext",
    "ClipDenoised",
    "Component",
    "ComponentLookupError",
    "Dataset",
    "Denoised",
    "Denoiser",
    "DiffkitError",
    "Guidance",
    "Objective",
    "Params",
    "Pipeline",
    "PluginError",
    "Predict",
    "Process",
    "Registry",
    "Sampler",
    "Schedule",
    "Seed",
    "Spacing",
    "SpecError",
    "StepCallback",
    "StepContext",
    "StepSamplerBase",
    "TensorData",
    "build",
    "get_registry",
    "hookimpl",
    "initial_state",
    "load_plugins",
    "report",
    "set_registry",
    "__version__",
]
