"""flaxdiff.parallel: the sharding rules on abstract models (tiny and SD 1.5, no memory), the mesh
and config errors, and pmap / mesh training steps on 8 virtual CPU devices that must reach the
params a single-device step reaches."""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import yaml
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from flaxdiff import optim, parallel
from flaxdiff.models import convert
from shared.config import build
from shared.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "configs" / "models"


def abstract_mesh(fsdp, data=1):
    return AbstractMesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def flax_cfg(**values):
    base = {"dataset_name": "tiny", "pretrained_model_name_or_path": "tiny"}
    return build("text2image", "flax", {**base, **values})


def model_yaml(name):
    return yaml.safe_load((MODELS / f"{name}.yaml").read_text())["model"]


def abstract_params(config):
    return nnx.state(convert.init_model(config, abstract=True), nnx.Param)


def train_state(params):
    """The abstract state the trainer keeps: params, AdamW state (bf16 moments), EMA, step, rng."""
    optimizer = optim.build_optimizer(
        flax_cfg(), learning_rate=1e-4, total_steps=10, moments_dtype=jnp.bfloat16
    )
    return {
        "params": params,
        "opt_state": jax.eval_shape(optimizer.init, params),
        "ema": params,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.eval_shape(jax.random.key, 0),
    }


@pytest.fixture(scope="module")
def tiny_state():
    return train_state(abstract_params(model_yaml("tiny")["unet_config"]))


def specs_by_path(state, mesh):
    shardings = parallel.state_shardings(state, mesh)
    return {
        parallel.path_str(path): (leaf, sharding.spec)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(shardings), strict=True
        )
    }


# --- rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "shape", "fsdp", "spec"),
    [
        ("a/kernel", (3, 3, 320, 640), 4, P(None, None, None, "fsdp")),  # largest dim
        ("a/kernel", (3, 3, 640, 320), 4, P(None, None, "fsdp")),
        ("a/kernel", (128, 128), 4, P(None, "fsdp")),  # a tie: the last dim
        ("a/kernel", (1001, 64), 4, P(None, "fsdp")),  # the largest DIVISIBLE dim
        ("a/kernel", (1001, 33), 4, P()),  # nothing divisible
        ("a/kernel", (127, 128), 4, P()),  # under 2**14 elements
        ("a/bias", (2**15,), 4, P()),  # a rule replicates biases and norms of any size
        ("a/norm/scale", (2**15,), 4, P()),
        ("a/kernel", (3, 3, 320, 640), 1, P()),  # no fsdp axis to shard over
    ],
)
def test_param_sharding_rules(path, shape, fsdp, spec):
    assert parallel.param_sharding(path, shape, abstract_mesh(fsdp)) == spec


def test_rules_are_matched_on_paths_in_order():
    mesh = abstract_mesh(4)
    rules = (parallel.ShardingRule(r"embedding$", shard=False), *parallel.DEFAULT_RULES)
    assert parallel.param_sharding("x/token_embedding/embedding", (4096, 64), mesh) == P("fsdp")
    assert parallel.param_sharding("x/emb/embedding", (4096, 64), mesh, rules=rules) == P()
    assert parallel.param_sharding("x/fc/kernel", (4096, 64), mesh, rules=rules) == P("fsdp")
    # A path no rule matches is replicated.
    only = (parallel.ShardingRule(r"conv", shard=True),)
    assert parallel.param_sharding("x/fc/kernel", (4096, 64), mesh, rules=only) == P()


def test_path_str_names_the_parameter_in_nnx_and_optax_trees(tiny_state):
    names = [parallel.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tiny_state)]
    assert "params/conv_in/kernel" in names  # the nnx.Variable's trailing `.value` dropped
    assert "ema/conv_in/kernel" in names
    assert any(n.endswith("/mu/conv_in/kernel") for n in names)  # optax's NamedTuple field
    assert "step" in names and "rng" in names


@pytest.mark.parametrize("fsdp", [2, 8])
def test_tiny_unet_state_large_arrays_sharded_and_moments_follow_params(tiny_state, fsdp):
    specs = specs_by_path(tiny_state, abstract_mesh(fsdp))
    params = {k[len("params/") :]: v for k, v in specs.items() if k.startswith("params/")}
    large = [
        k for k, (leaf, _) in params.items() if math.prod(leaf.shape) >= parallel.MIN_SHARD_SIZE
    ]
    assert len(large) > 10
    assert all("fsdp" in params[k][1] for k in large), [k for k in large if params[k][1] == P()]
    followers = 0
    for name, (leaf, spec) in specs.items():
        if name.startswith("params/"):
            continue
        owner = max((p for p in params if name.endswith("/" + p)), key=len, default=None)
        if owner is None:  # the step, the rng, Adam's count: scalars
            assert leaf.shape == () and spec == P(), name
            continue
        followers += 1
        assert spec == params[owner][1], name  # mu (bf16), nu and the EMA copy: the param's spec
    assert followers == 3 * len(params)


def test_sd15_fsdp8_shards_every_large_array_and_divides_the_memory():
    """UNet (860M), CLIP text tower (123M) and VAE (84M), abstract: no memory is allocated."""
    config = model_yaml("sd15")
    mesh8, mesh1 = abstract_mesh(8), abstract_mesh(1, data=8)
    models = {
        name: abstract_params(config[name])
        for name in ("unet_config", "text_encoder_config", "vae_config")
    }
    for component, params in models.items():
        specs = specs_by_path(params, mesh8)
        unsharded = [
            (name, leaf.shape)
            for name, (leaf, spec) in specs.items()
            if math.prod(leaf.shape) >= parallel.MIN_SHARD_SIZE and spec == P()
        ]
        assert unsharded == [], component
    state = train_state(models["unet_config"])
    replicated = parallel.bytes_per_device(state, parallel.state_shardings(state, mesh1))
    sharded = parallel.bytes_per_device(state, parallel.state_shardings(state, mesh8))
    # fp32 params + bf16 mu + bf16 nu + fp32 EMA of 859.5M weights = 12 bytes each.
    assert replicated == pytest.approx(859_520_964 * 12, rel=1e-6)
    small = sum(
        parallel.bytes_per_device(leaf, parallel.state_shardings(leaf, mesh1))
        for leaf in jax.tree.leaves(state)
        if math.prod(leaf.shape) < parallel.MIN_SHARD_SIZE
    )
    assert sharded == pytest.approx((replicated - small) / 8 + small, rel=1e-9)
    assert sharded < 0.13 * replicated
    print(
        f"\nSD 1.5 UNet train state per device: replicated {replicated / 2**30:.2f} GiB, "
        f"fsdp=8 {sharded / 2**30:.2f} GiB (replicated small arrays {small / 2**20:.1f} MiB)"
    )


# --- mesh and config ---------------------------------------------------------------------------


def test_make_mesh_sizes_and_errors():
    mesh = parallel.make_mesh(data=-1, fsdp=1)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert dict(parallel.make_mesh(data=1, fsdp=-1).shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(ConfigError, match="--fsdp_size=2 does not divide the 1 devices"):
        parallel.make_mesh(data=-1, fsdp=2)
    with pytest.raises(ConfigError, match="--fsdp_size"):
        parallel.make_mesh(data=2, fsdp=1)
    with pytest.raises(ConfigError, match="both are -1"):
        parallel.make_mesh(data=-1, fsdp=-1)


def test_strategy_from_config():
    pmap = parallel.strategy_from_config(flax_cfg(train_batch_size=3))
    assert isinstance(pmap, parallel.PmapStrategy) and pmap.name == "pmap"
    assert (pmap.num_devices, pmap.local_batch_size, pmap.global_batch_size) == (1, 3, 3)
    assert pmap.process_index == 0
    mesh = parallel.strategy_from_config(flax_cfg(parallelism="mesh", train_batch_size=2))
    assert isinstance(mesh, parallel.MeshStrategy)
    assert dict(mesh.mesh.shape) == {"data": 1, "fsdp": 1} and mesh.local_batch_size == 2
    with pytest.raises(ConfigError, match="--fsdp_size=2 does not divide"):
        parallel.strategy_from_config(flax_cfg(parallelism="mesh", fsdp_size=2))
    with pytest.raises(ConfigError, match="add --parallelism mesh"):
        parallel.strategy_from_config(flax_cfg(fsdp_size=2))


# --- 8 devices: every strategy trains like one device ------------------------------------------

# The linear-regression "model" every variant trains: params {w, b}, MSE, SGD with momentum, an
# EMA, a step counter and a key. Run in subprocesses, as the device count must be set before jax
# starts; each variant's results are printed as one JSON line and asserted here.
LINEAR_MODEL = textwrap.dedent(
    """
    import json, time, tracemalloc
    import jax, jax.numpy as jnp, numpy as np, optax
    from flaxdiff import parallel

    D_IN, D_OUT, B, STEPS = 256, 64, 32, 3  # w has 2**14 elements: the smallest sharded size
    tx = optax.sgd(0.1, momentum=0.9)

    def init_fn(rng):
        k1, k2 = jax.random.split(rng)
        params = {"w": 0.05 * jax.random.normal(k1, (D_IN, D_OUT)),
                  "b": jax.random.normal(k2, (D_OUT,))}
        return {"params": params, "opt_state": tx.init(params), "ema": params,
                "step": jnp.zeros((), jnp.int32), "rng": jax.random.key(7)}

    def make_step(strategy):
        mean = strategy.mean if strategy else (lambda tree: tree)
        def step(state, batch):
            def loss_fn(p):
                return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)
            loss, grads = jax.value_and_grad(loss_fn)(state["params"])
            loss, grads = mean((loss, grads))
            # An LR jitter drawn from the carried key: the key must travel intact.
            jitter = 1 + 0.1 * jax.random.uniform(jax.random.fold_in(state["rng"], state["step"]))
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], jax.tree.map(lambda u: jitter * u, updates))
            ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state["ema"], params)
            new = {"params": params, "opt_state": opt_state, "ema": ema,
                   "step": state["step"] + 1, "rng": state["rng"]}
            device_key = strategy.fold_in_device(state["rng"]) if strategy else state["rng"]
            return new, {"train/loss": loss, "device_key": jax.random.key_data(device_key)}
        return step

    def is_key(x):
        return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)

    rs = np.random.RandomState(0)
    batches = [{"x": rs.randn(B, D_IN).astype(np.float32), "y": rs.randn(B, D_OUT).astype(np.float32)}
               for _ in range(STEPS)]
    host = jax.device_get(jax.jit(init_fn)(jax.random.key(0)))  # numpy; the key stays a key
    untouched = {k: np.array(v, copy=True) for k, v in host["params"].items()}

    # The reference: one device, the whole global batch.
    reference, state = jax.jit(make_step(None)), host
    for batch in batches:
        state, _ = reference(state, batch)
    want = jax.device_get(state)

    def relative_errors(got):
        out = {}
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            if is_key(g):
                g, w = jax.random.key_data(g), jax.random.key_data(w)
            g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
            out[parallel.path_str(path)] = float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30))
        return out

    def tree_info(tree, fn):
        return {parallel.path_str(p): fn(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    def run(strategy, how):
        start = time.perf_counter()
        tracemalloc.start()
        state = strategy.place(host) if how == "place" else strategy.init(init_fn, jax.random.key(0))
        _, host_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        placed_specs = tree_info(state, lambda x: list(x.sharding.spec))
        step = strategy.compile(make_step(strategy))
        for batch in batches:
            # Each process loads only its rows (the loader's order[p::process_count]).
            rows = {k: v[strategy.process_index :: strategy.process_count] for k, v in batch.items()}
            sharded = strategy.shard_batch(rows)
            state, metrics = step(state, sharded)
        got = strategy.unreplicate(state)
        return {
            "rel": relative_errors(got),
            "placed_specs": placed_specs,
            "final_specs": tree_info(state, lambda x: list(x.sharding.spec)),
            "shapes": tree_info(state, lambda x: list(x.shape)),
            "host_types": sorted({type(x).__name__ for x in jax.tree.leaves(got)}),
            "host_peak_bytes": host_peak,
            "batch_spec": list(sharded["x"].sharding.spec),
            "batch_shape": list(sharded["x"].shape),
            "batch_shard_shape": list(sharded["x"].addressable_shards[0].data.shape),
            "device_keys": np.asarray(metrics["device_key"]).tolist(),
            "loss": float(strategy.unreplicate(metrics)["train/loss"]),
            "seconds": time.perf_counter() - start,
            "sizes": [strategy.num_devices, strategy.local_device_count, strategy.process_index,
                      strategy.process_count, strategy.local_batch_size, strategy.global_batch_size],
        }

    def run_mesh(fsdp, how):
        mesh = parallel.make_mesh(data=-1, fsdp=fsdp)
        return {**run(parallel.MeshStrategy(mesh, per_device_batch_size=4), how),
                "mesh": dict(mesh.shape)}
    """
)

# One process, 8 devices: every variant in one subprocess, so JAX's start-up is paid once.
EIGHT_DEVICES = LINEAR_MODEL + textwrap.dedent(
    """
    from shared.errors import ConfigError
    out = {"devices": jax.device_count()}
    out["pmap"] = run(parallel.PmapStrategy(per_device_batch_size=4), "place")
    out["pmap_init"] = run(parallel.PmapStrategy(per_device_batch_size=4), "init")
    for fsdp, how in ((1, "place"), (2, "place"), (4, "init")):
        out[f"mesh{fsdp}_{how}"] = run_mesh(fsdp, how)
    host_arrays = [x for x in jax.tree.leaves(host) if isinstance(x, np.ndarray)]
    out["state_bytes"] = sum(x.nbytes for x in host_arrays)
    out["largest_leaf_bytes"] = max(x.nbytes for x in host_arrays)
    out["host_intact"] = all(np.array_equal(untouched[k], host["params"][k]) for k in untouched)
    out["host_key_alive"] = not jax.random.key_data(host["rng"]).is_deleted()
    try:
        parallel.make_mesh(data=-1, fsdp=3)
    except ConfigError as e:
        out["fsdp3_error"] = str(e)
    print(json.dumps(out))
    """
)

# Two processes of 4 devices each (gloo collectives on CPU), as two TPU hosts run.
TWO_HOSTS = (
    textwrap.dedent(
        """
        import sys
        import jax
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
        """
    )
    + LINEAR_MODEL
    + textwrap.dedent(
        """
        out = {"pmap": run(parallel.PmapStrategy(per_device_batch_size=4), "place")}
        out["mesh4_place"] = run_mesh(4, "place")  # FSDP groups within a host
        out["mesh8_init"] = run_mesh(8, "init")  # FSDP groups across hosts: unreplicate gathers
        print(json.dumps(out))
        """
    )
)


@pytest.fixture(scope="module")
def eight_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def two_hosts():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-c", TWO_HOSTS, f"localhost:{port}"]
    hosts = [
        subprocess.Popen(
            [*command, str(i)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for host in hosts:
            stdout, stderr = host.communicate(timeout=300)
            assert host.returncode == 0, stderr[-4000:]
            outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for host in hosts:
            if host.poll() is None:
                host.kill()
    return outputs


VARIANTS = ["pmap", "pmap_init", "mesh1_place", "mesh2_place", "mesh4_init"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_strategy_trains_like_one_device(eight_devices, variant):
    assert eight_devices["devices"] == 8
    run = eight_devices[variant]
    # params, SGD momentum, EMA, step and rng after 3 steps: float32 rounding of the batch mean.
    assert max(run["rel"].values()) <= 1e-6, run["rel"]
    assert set(run["rel"]) == {
        "params/w", "params/b", "opt_state/0/trace/w", "opt_state/0/trace/b",
        "ema/w", "ema/b", "step", "rng",
    }  # fmt: skip
    assert run["host_types"] == ["PRNGKeyArray", "ndarray"]  # host copies; the key stays a key
    print(f"\n{variant}: 3 steps incl. compile {run['seconds']:.2f} s, loss {run['loss']:.5f}")


def test_pmap_layout(eight_devices):
    for variant in ("pmap", "pmap_init"):
        run = eight_devices[variant]
        assert all(s == ["devices"] for s in run["placed_specs"].values())
        assert run["shapes"]["params/w"] == [8, 256, 64]  # one replica per device
        assert run["shapes"]["rng"] == [8]
        assert run["batch_spec"] == ["devices"] and run["batch_shard_shape"] == [1, 4, 256]
        # Each device folds in its index: 8 distinct keys for 8 batch shards.
        assert len({tuple(k) for k in run["device_keys"]}) == 8


@pytest.mark.parametrize(
    ("variant", "fsdp"), [("mesh1_place", 1), ("mesh2_place", 2), ("mesh4_init", 4)]
)
def test_mesh_state_is_sharded_by_the_rules(eight_devices, variant, fsdp):
    run = eight_devices[variant]
    assert run["mesh"] == {"data": 8 // fsdp, "fsdp": fsdp}
    want_w = [] if fsdp == 1 else ["fsdp"]  # (256, 64): the largest dim over "fsdp"
    for specs in (run["placed_specs"], run["final_specs"]):  # created so, and kept by the step
        assert specs["params/w"] == specs["opt_state/0/trace/w"] == specs["ema/w"] == want_w
        assert specs["params/b"] == specs["step"] == specs["rng"] == []
    assert run["shapes"]["params/w"] == [256, 64]  # global arrays, no replica axis
    # The batch is split over every device, FSDP groups included.
    assert run["batch_spec"] == [["data", "fsdp"]] and run["batch_shard_shape"] == [4, 256]
    assert run["device_keys"] == [0, 7]  # the state's key itself: one draw for the global batch


def test_place_keeps_one_host_copy_and_the_callers_arrays(eight_devices):
    leaf, state = eight_devices["largest_leaf_bytes"], eight_devices["state_bytes"]
    assert state > 2 * leaf
    for variant in ("pmap", "mesh1_place", "mesh2_place"):
        # Leaf by leaf from the one host copy: host memory never grows by more than about a leaf
        # (a copy of the state would, and 8 per-device copies of any leaf would).
        assert eight_devices[variant]["host_peak_bytes"] < 2 * leaf, variant
    # Donating the placed state into the step did not touch the arrays it was placed from.
    assert eight_devices["host_intact"] and eight_devices["host_key_alive"]
    error = eight_devices["fsdp3_error"]
    assert "--fsdp_size=3 does not divide the 8 devices; use one of [1, 2, 4, 8]" in error


@pytest.mark.slow
def test_two_hosts_each_loading_half_of_the_batch_train_like_one_device(two_hosts):
    for process, out in enumerate(two_hosts):
        for variant, run in out.items():
            assert max(run["rel"].values()) <= 1e-6, (process, variant, run["rel"])
            # 8 devices, 4 local, this process of 2; 16 of the 32 examples loaded here.
            assert run["sizes"] == [8, 4, process, 2, 16, 32]
            print(f"\nhost {process} {variant}: 3 steps incl. compile {run['seconds']:.2f} s")
        assert out["pmap"]["batch_shape"] == [4, 4, 256]  # this host's devices only
        for variant in ("mesh4_place", "mesh8_init"):
            run = out[variant]
            assert run["batch_shape"] == [32, 256]  # one global batch from both hosts' rows
            assert run["final_specs"]["params/w"] == run["final_specs"]["ema/w"] == ["fsdp"]
        assert out["mesh8_init"]["mesh"] == {"data": 1, "fsdp": 8}
