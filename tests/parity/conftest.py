"""Helpers for the Flax-vs-PyTorch parity tests.

float64 proves that the two implementations compute the same function (agreement to rounding,
`F64_REL`); float32 is what users see (`F32_REL`). Never widen either to make a test pass.
"""

import jax
import numpy as np
import pytest

F64_REL = 1e-9
F32_REL = 1e-4


@pytest.fixture
def x64():
    """Runs a test with jax_enable_x64 on (float64 arrays), restoring the setting after."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def max_error(actual, reference) -> tuple[float, float]:
    """(max |actual - reference|, the bound scale max(1, max |reference|))."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert actual.shape == reference.shape, f"shape {actual.shape} != reference {reference.shape}"
    return float(np.abs(actual - reference).max()), max(1.0, float(np.abs(reference).max()))


def assert_parity(actual, reference, *, rel: float, what: str) -> float:
    """Asserts max |actual - reference| <= rel * max(1, max |reference|); returns the error."""
    error, scale = max_error(actual, reference)
    assert error <= rel * scale, f"{what}: max abs error {error:.3e} > {rel:g} x {scale:.3g}"
    print(f"parity {what}: max abs error {error:.3e} (scale {scale:.3g})")
    return error


def nchw_to_nhwc(array):
    return np.asarray(array).transpose(0, 2, 3, 1)


def nhwc_to_nchw(array):
    return np.asarray(array).transpose(0, 3, 1, 2)
