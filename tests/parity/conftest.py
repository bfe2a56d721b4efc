"""Fixtures of the Flax-vs-PyTorch parity tests; the comparison helpers are in parity_helpers.py."""

import jax
import pytest


@pytest.fixture
def x64():
    """Runs a test with jax_enable_x64 on (float64 arrays), restoring the setting after."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
