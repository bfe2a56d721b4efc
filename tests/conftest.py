"""Settings and fixtures for the whole test tree."""

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share a few cores: one OpenMP thread each (torch reads this when it
    # is first imported; subprocesses such as the demo and torchrun inherit it). Spinning OpenMP
    # threads of oversubscribed processes made the end-to-end tests 10x slower.
    os.environ["OMP_NUM_THREADS"] = "1"

# The dev install has libtpu (flaxdiff.plan compiles for TPUs without one). JAX would try to open
# a TPU at start and hold libtpu's lock file; the tests run on the CPU (subprocesses inherit it).
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def x64():
    """Runs a test with jax_enable_x64 on (float64 arrays), restoring the setting after."""
    import jax  # here: torch-only test runs never import JAX

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
