"""`flaxdiff.plan` and the trainer's fit check: the tiny preset's real train step compiled for a
TPU v3-8 (`v3:2x2`, libtpu, no TPU) under both strategies, and a run that cannot fit stopped
before step 1 with the flags that would make it fit."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdiff import memory, parallel, plan, step, trainer
from flaxdiff.components import load_components
from flaxdiff.models.layers import ModelOptions
from shared import cli
from shared.config import ConfigError
from shared.run.task import task_spec

pytest.importorskip("libtpu", reason="flaxdiff.plan compiles for TPUs through libtpu")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _flags(*extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "models" / "tiny-ddpm.yaml"),
        "--train_data_dir", "unused", "--output_dir", "unused", "--resolution", "32",
        "--train_batch_size", "2", "--use_ema", *extra,
    ]  # fmt: skip


def _cfg(*extra: str):
    return cli.parse_args(_flags(*extra), task="unconditional", backend="flax")


@pytest.fixture(scope="module")
def v3_8():
    return plan.topology_devices("v3-8")


def _logical_state_bytes(cfg, devices) -> int:
    """Bytes of the state one device holds under the strategy's layout (no TPU padding)."""
    spec = task_spec(cfg)
    components = load_components(cfg, ModelOptions.from_config(cfg), abstract=True)
    strategy = parallel.strategy_from_config(cfg, devices)
    parts = step.build_step(cfg, spec, components, strategy, learning_rate=1e-4, total_steps=1)
    state = {**parts.state, "frozen": parts.frozen}
    if strategy.name == "pmap":
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
    return parallel.bytes_per_device(state, strategy.shardings(state))


def test_the_tiny_step_compiles_for_a_v3_8_under_pmap_and_mesh(v3_8, tmp_path, capsys):
    assert len(v3_8) == 8 and v3_8[0].device_kind == "TPU v3"
    assert memory.device_memory_bytes(v3_8[0]) == 16 * memory.GIB  # half of a 32 GiB chip

    # pmap through the command line (table and JSON), mesh through the function.
    out = tmp_path / "plan.json"
    assert plan.main(["unconditional", "--topology", "v3-8", "--json", str(out), *_flags()]) == 0
    printed = capsys.readouterr().out
    assert "v3-8" in printed and "est. MFU" in printed
    (record,) = json.loads(out.read_text())
    mesh_cfg = _cfg("--parallelism", "mesh", "--fsdp_size", "8")
    mesh = plan.estimate(mesh_cfg, v3_8, topology="v3-8")

    assert record["parallelism"] == "pmap" and mesh.parallelism == "mesh"
    for e in (record, mesh.to_dict(memory.peak_flops(v3_8[0]))):
        assert e["devices"] == 8 and e["hbm_bytes"] == 16 * memory.GIB and e["fits"] is True
        assert e["flops_per_device"] > 0 and e["step_seconds"] > 0
        assert e["total_bytes"] >= e["arguments_bytes"] > 0
        assert 0 < e["mfu"] < 1
    # The arguments hold at least the state each device keeps (TPU layouts pad small dims).
    pmap_state = _logical_state_bytes(_cfg(), v3_8)
    mesh_state = _logical_state_bytes(mesh_cfg, v3_8)
    assert record["arguments_bytes"] >= pmap_state
    assert mesh.arguments_bytes >= mesh_state
    # FSDP over 8 devices keeps an eighth of each large array; the tiny model's many arrays under
    # MIN_SHARD_SIZE stay whole (measured: 2.7x less state per device).
    assert mesh_state < pmap_state / 2
    assert mesh.arguments_bytes < record["arguments_bytes"] / 2
    # The same examples per device: the same work per device, give or take the collectives.
    assert mesh.flops_per_device == pytest.approx(record["flops_per_device"], rel=0.25)


def test_an_unknown_topology_is_a_one_line_error():
    with pytest.raises(ConfigError, match="--topology v9-8"):
        plan.topology_devices("v9-8")


def test_a_step_that_cannot_fit_stops_with_the_flags_that_would_help(monkeypatch):
    compiled = jax.jit(lambda x: jnp.tanh(x) * 2).lower(jnp.zeros((256, 256))).compile()
    need = memory.step_memory(compiled)
    assert need.arguments == 256 * 256 * 4 and need.total >= need.arguments
    cfg = _cfg("--parallelism", "pmap")
    strategy = parallel.strategy_from_config(cfg)
    monkeypatch.setattr(memory, "device_memory_bytes", lambda device: need.total - 1)
    with pytest.raises(ConfigError) as error:
        trainer.check_fits(cfg, compiled, strategy)
    message = str(error.value)
    assert "\n" not in message and "per device" in message
    assert "--gradient_checkpointing" in message and "--adam_moments_dtype bfloat16" in message
    assert "--train_batch_size" in message
    monkeypatch.setattr(memory, "device_memory_bytes", lambda device: need.total)
    trainer.check_fits(cfg, compiled, strategy)  # exactly enough: no error


def test_xla_refusing_a_step_for_hbm_is_read_as_out_of_memory(v3_8):
    """On a TPU, XLA refuses at compile a program whose temporaries exceed the HBM; the planner
    reports it as not fitting and the trainer as a one-line error with the flags to try."""
    from jax.sharding import SingleDeviceSharding

    x = jax.ShapeDtypeStruct((8, 1024), jnp.float32, sharding=SingleDeviceSharding(v3_8[0]))
    huge = jax.jit(lambda x: (jnp.ones((2**32,)) * x.sum()).cumsum()[-1])  # 16 GiB temporary
    with pytest.raises(memory.OutOfMemory) as error:
        memory.compile_step(huge.lower(x))
    assert error.value.needed_gib >= 16 and error.value.usable_gib < 16
    assert memory.out_of_memory(RuntimeError("INVALID_ARGUMENT: shapes")) is None


def test_flash_attention_is_decided_by_the_devices_compiled_for(v3_8):
    """Mosaic builds the Pallas flash kernel for TPU v4 and later: a v4 plan may use it from
    this CPU machine, a v3 or a CPU run is refused in one line naming the alternative."""
    cfg = _cfg("--attention", "flash")
    step.check_attention(cfg, plan.topology_devices("v4-8"))
    for devices in (v3_8, jax.devices()):
        with pytest.raises(ConfigError, match=r"needs TPU v4 or later.*--attention dot_product"):
            step.check_attention(cfg, devices)
    step.check_attention(_cfg(), v3_8)  # dot_product runs anywhere


# The other way XLA:TPU refuses a step (here SD 1.5 DreamBooth under pmap on a v3-8, abridged):
# the whole program does not fit, with its breakdown.
_WHOLE_PROGRAM_OOM = """RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent \
error. Ran out of memory in memory space hbm. Used 15.57G of 15.48G hbm. Exceeded hbm capacity \
by 86.71M.

Total hbm usage >= 16.08G:
    reserved        530.01M
    program           5.54G
    arguments        10.03G
"""


def test_both_of_xlas_out_of_memory_messages_are_read():
    whole = memory.out_of_memory(RuntimeError(_WHOLE_PROGRAM_OOM))
    assert (whole.needed_gib, whole.usable_gib) == (15.57, 15.48)
    assert (whole.arguments_gib, whole.program_gib) == (10.03, 5.54)
    assert "arguments + program 15.57 GiB > the 15.48 GiB" in str(whole)
    temporaries = memory.out_of_memory(
        RuntimeError(
            "the total memory required for HLO temporaries (16.82G) exceeds available HBM (15.48G)."
        )
    )
    assert (temporaries.needed_gib, temporaries.usable_gib) == (16.82, 15.48)
    assert temporaries.arguments_gib is None and "temporaries 16.82 GiB" in str(temporaries)
    megabytes = memory.out_of_memory(RuntimeError("Used 512.00M of 1.00G hbm"))
    assert megabytes.needed_gib == 0.5
