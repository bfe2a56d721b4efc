"""flaxdiff.optim: the LR schedule and EMA decay against the numpy references of shared.run, AdamW
against torch's algorithm written out in float64 numpy, bfloat16 moments against the float32 path,
the non-finite skip, and accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxdiff import optim
from shared import cli
from shared.config import LR_SCHEDULERS, build
from shared.errors import ConfigError
from shared.run import ema as ema_ref
from shared.run import lr as lr_ref
from shared.run import resume

BASE_LR = 3e-3
WARMUP, TOTAL = 4, 20


def flax_cfg(**values):
    base = {"dataset_name": "tiny", "pretrained_model_name_or_path": "tiny"}
    return build("text2image", "flax", {**base, **values})


# --- learning-rate schedule ---------------------------------------------------------------------


def schedule_cfg(name):
    return flax_cfg(lr_scheduler=name, lr_warmup_steps=WARMUP, lr_num_cycles=3, lr_power=2.0)


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_schedule_equals_the_reference_at_every_update(name):
    cfg = schedule_cfg(name)
    schedule = optim.learning_rate_schedule(cfg, base_lr=BASE_LR, total_steps=TOTAL)
    steps = np.arange(TOTAL + 1)
    reference = np.array(
        [lr_ref.learning_rate(cfg.optim, base_lr=BASE_LR, total_steps=TOTAL, step=s) for s in steps]
    )
    got = np.asarray(schedule(jnp.asarray(steps)))
    assert got.dtype == np.float32
    # Bit-equal to the float32 rounding of the float64 reference at every update.
    np.testing.assert_array_equal(got, reference.astype(np.float32))
    # The step as the jitted train step passes it: a traced int32 scalar.
    assert float(jax.jit(schedule)(jnp.int32(WARMUP - 1))) == np.float32(reference[WARMUP - 1])
    if name != "constant":
        assert got[1] == np.float32(BASE_LR / WARMUP)  # the warmup ramp is really there


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_schedule_holds_the_end_value_past_the_last_update(name):
    cfg = schedule_cfg(name)
    schedule = optim.learning_rate_schedule(cfg, base_lr=BASE_LR, total_steps=TOTAL)
    past = np.asarray(schedule(jnp.arange(TOTAL, TOTAL + 6)))
    end = lr_ref.learning_rate(cfg.optim, base_lr=BASE_LR, total_steps=TOTAL, step=TOTAL)
    np.testing.assert_array_equal(past, np.float32(end))
    if name != "cosine":  # diffusers' plain cosine rises again past the end; the others hold
        after = lr_ref.learning_rate(cfg.optim, base_lr=BASE_LR, total_steps=TOTAL, step=TOTAL + 5)
        assert np.float32(after) == past[-1]


def test_schedule_is_float64_under_x64(x64):
    cfg = schedule_cfg("cosine_with_restarts")
    schedule = optim.learning_rate_schedule(cfg, base_lr=BASE_LR, total_steps=TOTAL)
    got = np.asarray(schedule(jnp.arange(TOTAL)))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(
        got, lr_ref.learning_rates(cfg.optim, base_lr=BASE_LR, total_steps=TOTAL)
    )


def test_schedule_rejects_what_diffusers_would_crash_on():
    cfg = flax_cfg(lr_scheduler="polynomial", lr_warmup_steps=TOTAL)
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        optim.learning_rate_schedule(cfg, base_lr=BASE_LR, total_steps=TOTAL)


# --- AdamW --------------------------------------------------------------------------------------


def torch_adamw_reference(params, grads_seq, lrs, o, applied):
    """torch.optim.AdamW after clip_grad_norm_, in float64 numpy; skipped updates not applied."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    t = 0
    for grads, rate, apply in zip(grads_seq, lrs, applied, strict=True):
        if not apply:
            continue
        t += 1
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        norm = np.sqrt(sum((x**2).sum() for x in g.values()))
        coef = min(o.max_grad_norm / (norm + 1e-6), 1.0)
        for k in p:
            gk = g[k] * coef
            p[k] = p[k] * (1 - rate * o.adam_weight_decay)
            m[k] = o.adam_beta1 * m[k] + (1 - o.adam_beta1) * gk
            v[k] = o.adam_beta2 * v[k] + (1 - o.adam_beta2) * gk**2
            denom = np.sqrt(v[k]) / np.sqrt(1 - o.adam_beta2**t) + o.adam_epsilon
            p[k] = p[k] - rate / (1 - o.adam_beta1**t) * m[k] / denom
    return p


def adam_cfg():
    return flax_cfg(
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_weight_decay=0.1,
        adam_epsilon=1e-6,
        max_grad_norm=1.0,
    )


def random_tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "w": (scale * rng.standard_normal((3, 4))).astype(np.float32),
        "b": (scale * rng.standard_normal(4)).astype(np.float32),
    }


# Gradient norms around 1: clipped on some updates (scale 2, 3), not on others (0.1, 0.3).
GRAD_SCALES = (2.0, 0.1, 3.0, 0.3, 1.5)


def run_updates(optimizer, params, grads_seq, losses):
    @jax.jit
    def update(grads, opt_state, params, step, loss):
        return optim.apply_gradients(optimizer, grads, opt_state, params, step=step, loss=loss)

    opt_state = optimizer.init(params)
    results = []
    for step, (grads, loss) in enumerate(zip(grads_seq, losses, strict=True)):
        result = update(grads, opt_state, params, jnp.int32(step), jnp.float32(loss))
        params, opt_state = result.params, result.opt_state
        results.append(result)
    return params, opt_state, results


def test_adamw_equals_torch_algorithm_in_float32():
    cfg = adam_cfg()
    total = 8
    optimizer = optim.build_optimizer(cfg, learning_rate=BASE_LR, total_steps=total)
    params = random_tree(0)
    grads_seq = [random_tree(10 + i, scale / 3) for i, scale in enumerate(GRAD_SCALES)]
    final, _, results = run_updates(optimizer, params, grads_seq, [1.0] * 5)
    lrs = lr_ref.learning_rates(cfg.optim, base_lr=BASE_LR, total_steps=total)[:5]
    expected = torch_adamw_reference(params, grads_seq, lrs, cfg.optim, [True] * 5)
    for key in params:
        moved = np.abs(expected[key] - params[key]).max()
        error = np.abs(np.asarray(final[key], np.float64) - expected[key]).max()
        assert moved > 1e-3  # the updates are real, not lost to rounding
        assert error <= 1e-6 * np.abs(expected[key]).max(), (key, error)
    norms = [float(r.grad_norm) for r in results]
    ref_norms = [np.sqrt(sum((g**2).sum() for g in gs.values())) for gs in grads_seq]
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-6)
    assert min(norms) < cfg.optim.max_grad_norm < max(norms)  # both clipping branches ran
    assert all(bool(r.finite) for r in results)


def test_nonfinite_update_keeps_state_and_the_lr_moves_on():
    cfg = adam_cfg()
    total = 8
    optimizer = optim.build_optimizer(cfg, learning_rate=BASE_LR, total_steps=total)
    params = random_tree(0)
    grads_seq = [random_tree(10 + i, scale / 3) for i, scale in enumerate(GRAD_SCALES)]
    grads_seq[2] = {"w": grads_seq[2]["w"], "b": np.full(4, np.inf, np.float32)}  # inf gradient
    losses = [1.0, np.nan, 1.0, 1.0, 1.0]  # NaN loss at update 1, finite gradients
    applied = [True, False, False, True, True]

    @jax.jit
    def update(grads, opt_state, params, step, loss):
        return optim.apply_gradients(optimizer, grads, opt_state, params, step=step, loss=loss)

    opt_state = optimizer.init(params)
    for step, (grads, loss) in enumerate(zip(grads_seq, losses, strict=True)):
        result = update(grads, opt_state, params, jnp.int32(step), jnp.float32(loss))
        assert bool(result.finite) == applied[step]
        if not applied[step]:
            # Bit-identical params and state: moments and Adam's count untouched.
            kept = (result.params, result.opt_state)
            for new, old in zip(
                jax.tree.leaves(kept), jax.tree.leaves((params, opt_state)), strict=True
            ):
                np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
        params, opt_state = result.params, result.opt_state
    adam_state = opt_state[1]
    assert int(adam_state.count) == sum(applied)
    # Updates 3 and 4 used the LR of steps 3 and 4 (global) with bias correction t = 2, 3.
    lrs = lr_ref.learning_rates(cfg.optim, base_lr=BASE_LR, total_steps=total)[:5]
    expected = torch_adamw_reference(random_tree(0), grads_seq, lrs, cfg.optim, applied)
    for key in params:
        error = np.abs(np.asarray(params[key], np.float64) - expected[key]).max()
        assert error <= 1e-6 * np.abs(expected[key]).max(), (key, error)


def test_update_needs_the_global_step():
    optimizer = optim.build_optimizer(adam_cfg(), learning_rate=BASE_LR, total_steps=4)
    params = random_tree(0)
    with pytest.raises(TypeError, match="global step"):
        optimizer.update(params, optimizer.init(params), params)


# --- bfloat16 moments (--adam_moments_dtype) ----------------------------------------------------


def test_bfloat16_moments_halve_the_state_and_stay_close():
    cfg = adam_cfg()
    params = random_tree(0)
    grads_seq = [random_tree(10 + i, scale / 3) for i, scale in enumerate(GRAD_SCALES)]
    runs = {}
    for dtype in ("float32", "bfloat16"):
        optimizer = optim.build_optimizer(
            cfg, learning_rate=BASE_LR, total_steps=8, moments_dtype=dtype
        )
        runs[dtype] = run_updates(optimizer, params, grads_seq, [1.0] * 5)
    (final16, state16, _), (final32, state32, _) = runs["bfloat16"], runs["float32"]
    adam16, adam32 = state16[1], state32[1]
    for name in ("mu", "nu"):
        leaves16, leaves32 = (
            jax.tree.leaves(getattr(adam16, name)),
            jax.tree.leaves(getattr(adam32, name)),
        )
        assert {x.dtype for x in leaves16} == {jnp.dtype(jnp.bfloat16)}
        assert {x.dtype for x in leaves32} == {jnp.dtype(jnp.float32)}
        assert 2 * sum(x.nbytes for x in leaves16) == sum(x.nbytes for x in leaves32)
    # The same state tree as the float32 path: checkpoints and sharding rules see the same paths.
    assert jax.tree.structure(state16) == jax.tree.structure(state32)
    assert int(adam16.count) == int(adam32.count) == 5
    for key in params:
        moved = np.abs(np.asarray(final32[key]) - params[key]).max()
        gap = np.abs(np.asarray(final16[key]) - np.asarray(final32[key])).max()
        assert 0 < gap <= 1e-2 * moved, (key, gap, moved)


def regression_grads(params, x, y):
    """Gradients of the mean squared error of the linear model `x @ w + b` against `y`."""

    def loss_fn(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    return jax.grad(loss_fn)(params)


def test_bfloat16_moments_track_float32_over_20_updates_and_float32_is_optax_adamw():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((32, 3)), jnp.float32)  # (N, 3)
    y = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)  # (N, 4)
    params0 = {k: jnp.asarray(v) for k, v in random_tree(0).items()}
    # Constant LR and clipping that never triggers (coefficient exactly 1): optax.adamw's terms.
    cfg = flax_cfg(
        lr_scheduler="constant", adam_weight_decay=0.1, adam_epsilon=1e-6, max_grad_norm=1e6
    )
    o, steps = cfg.optim, 20
    optimizers = {
        dtype: optim.build_optimizer(
            cfg, learning_rate=BASE_LR, total_steps=steps, moments_dtype=dtype
        )
        for dtype in ("float32", "bfloat16")
    }
    reference = optax.adamw(
        BASE_LR, b1=o.adam_beta1, b2=o.adam_beta2, eps=o.adam_epsilon, weight_decay=0.1
    )

    def run(update_fn, init_state):
        # Op by op, not one jitted step: XLA fuses two different graphs differently (an ulp).
        params, state = params0, init_state
        for t in range(steps):
            grads = regression_grads(params, x, y)
            updates, state = update_fn(grads, state, params, jnp.int32(t))
            params = optax.apply_updates(params, updates)
        return params

    finals = {
        dtype: run(lambda g, s, p, t, tx=tx: tx.update(g, s, p, step=t), tx.init(params0))
        for dtype, tx in optimizers.items()
    }
    expected = run(lambda g, s, p, t: reference.update(g, s, p), reference.init(params0))
    for key in params0:
        # float32: optax.adamw bit for bit (the new bfloat16 code is not on this path).
        np.testing.assert_array_equal(finals["float32"][key], expected[key])
        # bfloat16 stores the moments with 8 mantissa bits (relative rounding <= 2**-8 = 0.4%),
        # rounded stochastically and then averaged by the moving averages: the 20 updates' total
        # change of each tensor stays within 2% of the float32 path's (measured: ~0.3%).
        change32 = np.asarray(finals["float32"][key]) - np.asarray(params0[key])
        change16 = np.asarray(finals["bfloat16"][key]) - np.asarray(params0[key])
        error = np.linalg.norm(change16 - change32) / np.linalg.norm(change32)
        assert 0 < error < 2e-2, (key, error)


def test_bfloat16_moments_are_read_from_the_flag():
    params = random_tree(0)
    cfg = flax_cfg(adam_moments_dtype="bfloat16")
    state = optim.build_optimizer(cfg, learning_rate=BASE_LR, total_steps=4).init(params)
    assert {x.dtype for x in jax.tree.leaves((state[1].mu, state[1].nu))} == {
        jnp.dtype(jnp.bfloat16)
    }
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        optim.build_optimizer(cfg, learning_rate=BASE_LR, total_steps=4, moments_dtype="float16")


def test_stochastic_rounding_is_unbiased_and_keeps_non_finite_values():
    # 1 + 2**-10 lies 1/8 of the way from bfloat16's 1 to its next value 1 + 2**-7.
    x = jnp.full((1 << 14,), 1 + 2**-10, jnp.float32)
    bits = jax.random.bits(jax.random.key(0), x.shape, jnp.uint32) >> 16
    rounded = np.asarray(optim.stochastic_round_to_bfloat16(x, bits), np.float64)
    assert set(np.unique(rounded)) == {1.0, 1 + 2**-7}
    assert abs(rounded.mean() - (1 + 2**-10)) < 1e-4  # the up-fraction is 1/8 +- 3 sigma
    special = jnp.asarray([np.nan, np.inf, -np.inf, 0.0], jnp.float32)
    got = optim.stochastic_round_to_bfloat16(special, jnp.full(4, 0xFFFF, jnp.uint32))
    np.testing.assert_array_equal(np.asarray(got, np.float32), special)


def test_bfloat16_second_moment_follows_shrinking_gradients():
    """Round-to-nearest would freeze nu: with b2 = 0.999 an update moves it by at most 0.1%
    downwards, less than bfloat16's half-ulp. Stochastic rounding keeps it unbiased."""
    b2, n, steps = 0.999, 256, 3000
    scales = jnp.where(jnp.arange(steps) < steps // 2, 1.0, 0.1)  # gradients shrink 10x midway
    params = {"w": jnp.zeros((n,), jnp.float32)}

    def final_nu(tx):
        def body(state, inputs):
            t, scale = inputs
            grads = {"w": scale * jax.random.normal(jax.random.fold_in(jax.random.key(1), t), (n,))}
            return tx.update(grads, state, params)[1], None

        state, _ = jax.lax.scan(body, tx.init(params), (jnp.arange(steps), scales))
        return np.asarray(state.nu["w"], np.float64)

    nu32 = final_nu(optax.scale_by_adam(b2=b2))
    nu16 = final_nu(optim.scale_by_adam_bfloat16_moments(b1=0.9, b2=b2, eps=1e-8))
    assert abs(nu16.mean() / nu32.mean() - 1) < 0.03, (nu16.mean(), nu32.mean())


# --- the flag: validation and resume ------------------------------------------------------------

T2I_ARGV = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d"]


def test_adam_moments_dtype_flag_is_validated():
    cfg = cli.parse_args(
        [*T2I_ARGV, "--adam_moments_dtype", "bfloat16"], task="text2image", backend="flax"
    )
    assert cfg.flax.adam_moments_dtype == "bfloat16"
    with pytest.raises(
        ConfigError, match="--adam_moments_dtype is a flax-only flag; use --use_8bit_adam on torch"
    ):
        cli.parse_args(
            [*T2I_ARGV, "--adam_moments_dtype", "bfloat16"], task="text2image", backend="torch"
        )
    with pytest.raises(ConfigError, match="--adam_moments_dtype='float16' is not valid"):
        cli.parse_args(
            [*T2I_ARGV, "--adam_moments_dtype", "float16"], task="text2image", backend="flax"
        )


def test_resume_refuses_another_adam_moments_dtype(tmp_path):
    saved = flax_cfg(output_dir=str(tmp_path / "out"))
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    cli.save_config(saved, ckpt / "config.yaml")
    new = flax_cfg(output_dir=str(tmp_path / "out"), adam_moments_dtype="bfloat16")
    with pytest.raises(ConfigError) as info:
        resume.check_resume_config(ckpt, new, step=2)
    message = str(info.value)
    assert "\n" not in message
    assert "--adam_moments_dtype 'float32' -> 'bfloat16'" in message
    assert "training state has another layout" in message


# --- gradient accumulation ----------------------------------------------------------------------


def mse_value_and_grad(params, batch, micro_step):
    def loss_fn(p):
        return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return (loss, micro_step.astype(jnp.float32), batch.get("row")), grads


def test_accumulated_micro_batches_equal_one_batch():
    params = {k: jnp.asarray(v) for k, v in random_tree(0).items()}
    rng = np.random.default_rng(1)
    batch = {
        "x": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32),
        "y": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
        "row": jnp.arange(8, dtype=jnp.float32),
    }
    accumulate = jax.jit(
        lambda p, b: optim.accumulate_gradients(mse_value_and_grad, p, b, accumulation_steps=4)
    )
    (loss, mean_micro_step, mean_rows), grads = accumulate(params, batch)
    (whole_loss, _, _), whole_grads = mse_value_and_grad(params, batch, jnp.int32(0))
    assert float(mean_micro_step) == 1.5  # micro-steps 0, 1, 2, 3 were passed
    # Strided micro-batches: rows (0, 4), (1, 5), (2, 6), (3, 7), averaged position by position.
    np.testing.assert_array_equal(mean_rows, [1.5, 5.5])
    np.testing.assert_allclose(float(loss), float(whole_loss), rtol=1e-6)
    for key in params:
        scale = np.abs(np.asarray(whole_grads[key])).max()
        np.testing.assert_allclose(grads[key], whole_grads[key], rtol=0, atol=1e-6 * scale)
    with pytest.raises(ValueError, match="multiple"):
        optim.accumulate_gradients(
            mse_value_and_grad, params, {"x": batch["x"][:7]}, accumulation_steps=4
        )


# --- EMA ----------------------------------------------------------------------------------------

EMA_CASES = {
    "no_warmup_clamped": {"ema_use_warmup": False, "ema_max_decay": 0.8},
    "no_warmup_default": {"ema_use_warmup": False},
    "warmup_clamped": {
        "ema_use_warmup": True,
        "ema_inv_gamma": 2.0,
        "ema_power": 0.75,
        "ema_max_decay": 0.9,
    },
}


@pytest.mark.parametrize("case", EMA_CASES)
def test_ema_decay_equals_the_reference(case):
    cfg = flax_cfg(use_ema=True, **EMA_CASES[case])
    steps = np.arange(1, 51)
    reference = np.array([ema_ref.decay_from_config(cfg.ema, int(n)) for n in steps])
    got = np.asarray(optim.ema_decay(jnp.asarray(steps), cfg.ema), np.float64)
    assert got[0] == 0.0 and reference[0] == 0.0
    if cfg.ema.ema_use_warmup:
        # float32 pow in jnp: within one float32 ulp (2**-23 relative) of the float64 reference.
        np.testing.assert_allclose(got, reference, rtol=2**-23, atol=0)
    else:
        # (1 + s) / (10 + s) is one correctly rounded division of exact integers.
        np.testing.assert_array_equal(got, reference.astype(np.float32))
    clamped = reference == cfg.ema.ema_max_decay
    assert clamped.any() == case.endswith("clamped")
    np.testing.assert_array_equal(got[clamped], np.float32(cfg.ema.ema_max_decay))


def test_ema_decay_under_x64_is_the_reference_to_rounding(x64):
    cfg = flax_cfg(use_ema=True, **EMA_CASES["warmup_clamped"])
    steps = np.arange(1, 51)
    reference = np.array([ema_ref.decay_from_config(cfg.ema, int(n)) for n in steps])
    got = np.asarray(optim.ema_decay(jnp.asarray(steps), cfg.ema))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, reference, rtol=1e-15, atol=0)


def test_ema_update_equals_the_reference():
    cfg = flax_cfg(use_ema=True, ema_use_warmup=True, ema_max_decay=0.6)
    ema = {k: jnp.asarray(v) for k, v in random_tree(0).items()}
    expected = {k: np.asarray(v, np.float64) for k, v in ema.items()}
    update = jax.jit(lambda e, p, n: optim.ema_update(e, p, step=n, cfg_ema=cfg.ema))
    for n in range(1, 7):
        params = random_tree(n)
        shadow = {k: np.asarray(v) for k, v in ema.items()}
        ema = update(ema, params, jnp.int32(n))
        decay = ema_ref.decay_from_config(cfg.ema, n)
        expected = {k: ema_ref.ema_update(expected[k], params[k], decay) for k in expected}
        if n == 1:
            # Decay 0: diffusers' form `s - 1 * (s - p)` is the weights up to float32 rounding,
            # and bit-equal to the same form evaluated in float32 numpy.
            for k in params:
                np.testing.assert_array_equal(ema[k], ema_ref.ema_update(shadow[k], params[k], 0.0))
    for key in expected:
        assert ema[key].dtype == jnp.float32
        np.testing.assert_allclose(ema[key], expected[key], rtol=0, atol=1e-6)
