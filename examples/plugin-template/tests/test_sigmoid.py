"""The plugin's tests, written with diffkit's conformance kit (diffkit.testing).

The fixtures ``diffkit_registry`` and ``diffkit_plugin`` come from diffkit's pytest
plugin, which pytest loads by itself wherever diffkit is installed.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import diffkit
from diffkit.testing import check_sampler, check_schedule, installed_registry, isolated_registry, registered
from diffkit.testing.strategies import params

from diffkit_sigmoid import plugin
from diffkit_sigmoid.schedule import SigmoidParams


@pytest.fixture
def sigmoid_plugin(diffkit_plugin):
    """This plugin registered next to diffkit's built-ins, and nothing else that is installed."""
    with diffkit_plugin(plugin, "sigmoid") as entries:
        yield entries


def test_the_plugin_provides_a_schedule_and_a_sampler(sigmoid_plugin):
    assert sorted((e.kind, e.name) for e in sigmoid_plugin) == [("sampler", "reverse-sde"), ("schedule", "sigmoid")]


def test_sigmoid_schedule_conforms(sigmoid_plugin):
    check_schedule("sigmoid")
    check_schedule("sigmoid", {"timesteps": 100, "tau": 0.5})


@settings(max_examples=20, deadline=None)
@given(section=params(SigmoidParams, timesteps=st.integers(2, 300)))
def test_every_valid_sigmoid_schedule_conforms(section):
    with isolated_registry() as registry, registered(plugin, "sigmoid", registry=registry):
        check_schedule("sigmoid", section)


def test_reverse_sde_conforms(sigmoid_plugin):
    check_sampler("reverse-sde")


def test_reverse_sde_with_fewer_steps_on_the_sigmoid_schedule(sigmoid_plugin):
    check_sampler("reverse-sde", {"steps": 200}, schedule=diffkit.build("schedule", "sigmoid"))


def test_installed_through_its_entry_point():
    """Passes once the distribution is installed (pip install -e .): diffkit finds it. Only
    this distribution's entry points are loaded, so another broken plugin installed beside
    it cannot fail this test."""
    with installed_registry("diffkit-sigmoid") as registry:
        entry = registry.get("schedule", "sigmoid")
        assert (entry.plugin, entry.distribution, entry.api) == ("sigmoid", "diffkit-sigmoid", diffkit.API_VERSION)
