"""The plugin author's test kit: conformance checks, fixtures and hypothesis strategies.

One line per component checks it against its interface's contract; each raises
:class:`ConformanceError` (an ``AssertionError``) whose message says what is wrong::

    from diffkit.testing import check_schedule, check_sampler

    def test_sigmoid_schedule():
        check_schedule("sigmoid", {"timesteps": 500})

    def test_reverse_sde_sampler():
        check_sampler("reverse-sde")

The pytest fixtures (``diffkit_registry``, ``diffkit_plugin``) are registered with pytest
through the entry point ``pytest11`` when diffkit is installed; the hypothesis
strategies live in :mod:`diffkit.testing.strategies`.

Certification with exact oracles (measured order of convergence, the exact law, and
invariance under the parameterisation) is :func:`diffkit.testing.certify.check_sampler`,
exported here as ``certify_sampler`` (``check_sampler`` here is the conformance check)::

    from diffkit.testing import certify_sampler
    certify_sampler("heun", ["edm", "vp"])   # prints the report table
"""

from diffkit.testing import certify
from diffkit.testing._common import ConformanceError, check_params, reference_schedule
from diffkit.testing.certify import CertificationReport
from diffkit.testing.certify import check_sampler as certify_sampler
from diffkit.testing.dataset import check_dataset
from diffkit.testing.denoiser import check_denoiser
from diffkit.testing.guidance import check_guidance
from diffkit.testing.objective import check_objective
from diffkit.testing.plugin import installed_registry, isolated_registry, registered
from diffkit.testing.sampler import check_sampler
from diffkit.testing.schedule import check_schedule

__all__ = [
    "CertificationReport",
    "ConformanceError",
    "certify",
    "certify_sampler",
    "check_dataset",
    "check_denoiser",
    "check_guidance",
    "check_objective",
    "check_params",
    "check_sampler",
    "check_schedule",
    "installed_registry",
    "isolated_registry",
    "reference_schedule",
    "registered",
]
