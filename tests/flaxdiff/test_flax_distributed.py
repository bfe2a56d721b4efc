"""When `flaxdiff.distributed.initialize` joins processes, and the one-line errors of a bad
environment (the two-process runs themselves are in test_flax_multihost.py)."""

from __future__ import annotations

import pytest

from flaxdiff import distributed
from shared.config import ConfigError


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*distributed._ENV, "TWINDIFF_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_initialized", lambda: False)
    calls = []
    monkeypatch.setattr(
        distributed.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k))
    )
    return calls


def test_one_process_without_a_coordinator_or_a_tpu(clean_env, monkeypatch):
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    assert distributed.initialize() is False and clean_env == []


def test_the_coordinator_environment_is_passed_on(clean_env, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    monkeypatch.setattr(distributed.jax, "process_index", lambda: 1)
    assert distributed.initialize() is True
    assert clean_env == [(("127.0.0.1:1234",), {"num_processes": 2, "process_id": 1})]


@pytest.mark.parametrize(
    ("count", "index", "match"),
    [(None, "0", "JAX_NUM_PROCESSES"), ("2", "x", "JAX_PROCESS_ID='x'"), ("2", "2", "0..1")],
)
def test_a_bad_coordinator_environment_is_one_line(clean_env, monkeypatch, count, index, match):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    if count is not None:
        monkeypatch.setenv("JAX_NUM_PROCESSES", count)
    monkeypatch.setenv("JAX_PROCESS_ID", index)
    with pytest.raises(ConfigError, match=match) as error:
        distributed.initialize()
    assert "\n" not in str(error.value) and clean_env == []


def test_a_tpu_vm_initializes_without_arguments_unless_opted_out(clean_env, monkeypatch):
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: True)
    monkeypatch.setattr(distributed.jax, "process_count", lambda: 1)
    assert distributed.initialize() is True and clean_env == [((), {})]
    monkeypatch.setenv("TWINDIFF_DISTRIBUTED", "0")
    assert distributed.initialize() is False and len(clean_env) == 1


def test_a_tpu_vm_whose_metadata_fails_names_the_environment_to_set(clean_env, monkeypatch):
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: True)

    def fail(*args, **kwargs):
        raise RuntimeError("metadata server unreachable\nmore")

    monkeypatch.setattr(distributed.jax.distributed, "initialize", fail)
    with pytest.raises(ConfigError, match=r"unreachable.*JAX_COORDINATOR_ADDRESS") as error:
        distributed.initialize()
    assert "\n" not in str(error.value)
