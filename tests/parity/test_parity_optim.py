"""flaxdiff.optim vs torchdiff.optim in float64: clipped AdamW with a warmup + cosine schedule, a
skipped non-finite update, and diffusers' EMAModel, one update at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from parity_helpers import max_error  # noqa: E402

from flaxdiff import optim as flax_optim  # noqa: E402
from shared.config import build  # noqa: E402
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
    """max |actual - reference| <= REL * max |reference|: relative to the tensor's own size (the
    moments are far below 1, where parity_helpers' max(1, .) scale would hide an error)."""
    error, _ = max_error(actual, reference)
    scale = float(np.abs(np.asarray(reference)).max())
    assert error <= REL * scale, f"{what}: max abs error {error:.3e} > {REL:g} x {scale:.3g}"
    print(f"parity {what}: max relative error {error / scale:.3e}")
    return error / scale


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
