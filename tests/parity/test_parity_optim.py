"""flaxdiff.optim vs torchdiff.optim in float64: clipped AdamW with a warmup + cosine schedule, a
skipped non-finite update, and diffusers' EMAModel, one update at a time; and every
`--lr_scheduler` choice with warmup, update by update, against diffusers' `get_scheduler` and the
numpy reference `shared.run.lr`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from parity_helpers import assert_parity  # noqa: E402

from flaxdiff import optim as flax_optim  # noqa: E402
from shared.config import LR_SCHEDULERS, build  # noqa: E402
from shared.run import lr as lr_ref  # noqa: E402
from torchdiff import optim as torch_optim  # noqa: E402

# The two sides differ only in operation order (torch decays the weights before the Adam step,
# optax adds the decay to the direction), so float64 rounding is all that may separate them.
REL = 1e-12
LR = 2e-2
TOTAL = 10
SHAPES = {"weight": (3, 4), "bias": (4,), "scale": (2, 2, 3)}
# Gradient scales per update: clipped (norm above max_grad_norm) and not, and update 2 non-finite.
GRAD_SCALES = (3.0, 0.2, None, 2.0, 0.5, 4.0)


def assert_close(actual, reference, *, what: str) -> float:
    """max |actual - reference| <= REL * max |reference|; returns the relative error."""
    return assert_parity(actual, reference, rel=REL, what=what)


def configs(**ema):
    values = {
        "dataset_name": "tiny",
        "pretrained_model_name_or_path": "tiny",
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 2,
        "adam_beta1": 0.85,
        "adam_beta2": 0.99,
        "adam_weight_decay": 0.05,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "use_ema": True,
        **ema,
    }
    return build("text2image", "torch", values), build("text2image", "flax", values)


class Tiny(torch.nn.Module):
    """A few float64 parameters and the `config` that `build_ema` hands to `EMAModel`."""

    config: dict = {}  # noqa: RUF012 (read-only, as a diffusers model's FrozenDict)

    def __init__(self, arrays):
        super().__init__()
        for name, value in arrays.items():
            self.register_parameter(name, torch.nn.Parameter(torch.from_numpy(value.copy())))


def gradients(rng):
    """Per-update gradients; None where the update gets a NaN gradient."""
    out = []
    for scale in GRAD_SCALES:
        grads = {k: rng.standard_normal(s) * (scale or 1.0) / 3 for k, s in SHAPES.items()}
        if scale is None:
            grads["bias"][1] = np.nan
        out.append(grads)
    return out


@pytest.mark.parametrize(
    "ema",
    [
        {"ema_use_warmup": False, "ema_max_decay": 0.3},
        {"ema_use_warmup": True, "ema_inv_gamma": 1.0, "ema_power": 2 / 3, "ema_max_decay": 0.6},
    ],
    ids=["ema_default_clamped", "ema_warmup_clamped"],
)
def test_adamw_schedule_and_ema_match_torch(x64, ema):
    torch_cfg, flax_cfg = configs(**ema)
    rng = np.random.default_rng(0)
    init = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads_seq = gradients(rng)

    model = Tiny(init)
    params = list(model.parameters())
    optimizer = torch_optim.build_optimizer(params, torch_cfg, learning_rate=LR)
    scheduler = torch_optim.build_lr_scheduler(optimizer, torch_cfg, max_train_steps=TOTAL)
    ema_model = torch_optim.build_ema(model, torch_cfg)

    tx = flax_optim.build_optimizer(flax_cfg, learning_rate=LR, total_steps=TOTAL)
    flax_params = {k: jnp.asarray(v) for k, v in init.items()}
    opt_state = tx.init(flax_params)
    flax_ema = dict(flax_params)
    ema_step = 0

    @jax.jit
    def step_fn(grads, opt_state, params, ema, ema_step, step):
        result = flax_optim.apply_gradients(tx, grads, opt_state, params, step=step, loss=1.0)
        ema_step = ema_step + result.finite
        new_ema = flax_optim.ema_update(ema, result.params, step=ema_step, cfg_ema=flax_cfg.ema)
        return result, flax_optim.select_tree(result.finite, new_ema, ema), ema_step

    clipped = []
    for step, grads in enumerate(grads_seq):
        # torch, as torchdiff.trainer.train_step: clip, step only if finite, schedule always.
        for name, p in model.named_parameters():
            p.grad = torch.from_numpy(grads[name].copy())
        norm = float(torch.nn.utils.clip_grad_norm_(params, torch_cfg.optim.max_grad_norm))
        finite = np.isfinite(norm)
        if finite:
            optimizer.step()
        scheduler.step()
        if finite:
            ema_model.step(model.parameters())

        result, flax_ema, ema_step = step_fn(
            {k: jnp.asarray(v) for k, v in grads.items()},
            opt_state,
            flax_params,
            flax_ema,
            ema_step,
            jnp.int32(step),
        )
        flax_params, opt_state = result.params, result.opt_state
        assert bool(result.finite) == finite
        if finite:
            assert_close(result.grad_norm, norm, what=f"grad norm {step}")
            clipped.append(norm > torch_cfg.optim.max_grad_norm)
        for name, p in model.named_parameters():
            ref = p.detach().numpy()
            assert_close(flax_params[name], ref, what=f"{name} after update {step}")
        for name, shadow in zip(SHAPES, ema_model.shadow_params, strict=True):
            ref = shadow.numpy()
            assert_close(flax_ema[name], ref, what=f"EMA {name} after update {step}")
    assert any(clipped) and not all(clipped)
    assert int(ema_step) == ema_model.optimization_step == len(GRAD_SCALES) - 1
    assert (
        int(opt_state[1].count) == int(optimizer.state[params[0]]["step"]) == len(GRAD_SCALES) - 1
    )
    # The clamp was reached, so the capped branch of the decay was compared too.
    assert ema_model.cur_decay_value == torch_cfg.ema.ema_max_decay
    # Moments too, not only their effect on the weights.
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        assert_close(opt_state[1].mu[name], state["exp_avg"].numpy(), what=f"m {name}")
        assert_close(opt_state[1].nu[name], state["exp_avg_sq"].numpy(), what=f"v {name}")


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules: the LR of every update, all four ways

SCHEDULE_TOTAL, SCHEDULE_WARMUP = 30, 5
# The flags each schedule reads beyond the warmup: 3 restarts in 25 decay updates land the restarts
# between updates; power 2 makes the polynomial curve, not a line.
SCHEDULE_FLAGS = {"cosine_with_restarts": {"lr_num_cycles": 3}, "polynomial": {"lr_power": 2.0}}


def schedule_configs(name: str):
    """torch and flax configs of `name` with warmup; no weight decay, so an update is -lr * Adam."""
    values = {
        "dataset_name": "tiny",
        "pretrained_model_name_or_path": "tiny",
        "lr_scheduler": name,
        "lr_warmup_steps": SCHEDULE_WARMUP,
        "adam_weight_decay": 0.0,
        **SCHEDULE_FLAGS.get(name, {}),
    }
    return build("text2image", "torch", values), build("text2image", "flax", values)


def diffusers_lrs(name: str, optim_cfg) -> np.ndarray:
    """`param_groups[0]["lr"]` before each update of an SGD scheduled by diffusers' get_scheduler."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=optim_cfg.lr_warmup_steps,
        num_training_steps=SCHEDULE_TOTAL,
        num_cycles=optim_cfg.lr_num_cycles,
        power=optim_cfg.lr_power,
    )
    lrs = []
    for _ in range(SCHEDULE_TOTAL):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradient: a no-op that keeps torch's call-order check quiet
        scheduler.step()
    return np.array(lrs)


def torchdiff_lrs(torch_cfg) -> np.ndarray:
    """The LR torchdiff's AdamW applies at each update (its param group's, set by the scheduler)."""
    weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    optimizer = torch_optim.build_optimizer([weight], torch_cfg, learning_rate=LR)
    scheduler = torch_optim.build_lr_scheduler(optimizer, torch_cfg, max_train_steps=SCHEDULE_TOTAL)
    lrs = []
    for _ in range(SCHEDULE_TOTAL):
        lrs.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.full_like(weight, 0.5)
        optimizer.step()
        scheduler.step()
    return np.array(lrs)


def flaxdiff_applied_lrs(flax_cfg) -> np.ndarray:
    """The LR flaxdiff's optimizer applies at each update, read back from the update itself.

    A constant gradient g = 0.5 (below max_grad_norm: no clipping) makes Adam's bias-corrected
    moments g and g^2 at every update, so without weight decay the update is exactly
    -lr * g / (g + eps), up to float64 rounding of the moment recursions.
    """
    g, eps = 0.5, flax_cfg.optim.adam_epsilon
    assert g < flax_cfg.optim.max_grad_norm and flax_cfg.optim.adam_weight_decay == 0
    tx = flax_optim.build_optimizer(flax_cfg, learning_rate=LR, total_steps=SCHEDULE_TOTAL)
    params = {"w": jnp.zeros((1,))}
    grads = {"w": jnp.full((1,), g)}
    state = tx.init(params)
    update = jax.jit(lambda state, params, step: tx.update(grads, state, params, step=step))
    lrs = []
    for step in range(SCHEDULE_TOTAL):
        updates, state = update(state, params, jnp.int32(step))
        params = optax.apply_updates(params, updates)
        lrs.append(-float(updates["w"][0]) * (g + eps) / g)
    return np.array(lrs)


def schedule_relative_error(actual, reference, *, what: str) -> float:
    """max over updates of |actual - reference| / |reference|; an LR of 0 (the warmup's first
    update) must be exactly 0."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape == (SCHEDULE_TOTAL,), what
    zero = reference == 0
    np.testing.assert_array_equal(actual[zero], 0.0, err_msg=f"{what}: an LR of 0 moved")
    error = float((np.abs(actual - reference)[~zero] / np.abs(reference[~zero])).max())
    assert error <= REL, f"{what}: relative error {error:.3e} > {REL:g}"
    return error


def test_schedule_choices_are_diffusers_schedules():
    """Every --lr_scheduler choice is one of diffusers' get_scheduler types (same name, same
    meaning), so the comparison below covers all the config accepts."""
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULERS) <= {t.value for t in SchedulerType}
    assert set(SCHEDULE_FLAGS) <= set(LR_SCHEDULERS)


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_every_schedule_gives_the_same_lr_at_every_update(x64, name):
    torch_cfg, flax_cfg = schedule_configs(name)
    reference = lr_ref.learning_rates(flax_cfg.optim, base_lr=LR, total_steps=SCHEDULE_TOTAL)
    schedule = flax_optim.learning_rate_schedule(flax_cfg, base_lr=LR, total_steps=SCHEDULE_TOTAL)
    results = {
        "diffusers get_scheduler": diffusers_lrs(name, torch_cfg.optim),
        "torchdiff": torchdiff_lrs(torch_cfg),
        "flaxdiff schedule": np.asarray(schedule(jnp.arange(SCHEDULE_TOTAL))),
        "flaxdiff optimizer": flaxdiff_applied_lrs(flax_cfg),
    }
    assert results["flaxdiff schedule"].dtype == np.float64
    errors = {
        side: schedule_relative_error(lrs, reference, what=f"{name} {side}")
        for side, lrs in results.items()
    }
    print(f"parity lr {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    # The schedule is really there: a warmup ramp, then not constant (except `constant`, which
    # ignores the warmup as diffusers does).
    if name == "constant":
        np.testing.assert_array_equal(reference, LR)
    else:
        assert reference[0] == 0 and reference[SCHEDULE_WARMUP] == pytest.approx(LR, rel=REL)
        if name != "constant_with_warmup":
            assert reference[-1] < reference[SCHEDULE_WARMUP + 1] < LR
