"""torchdiff.optim: AdamW hyper-parameters, the six lr schedules against closed forms, EMA numerics
against a hand-computed average, and exact resumes of the scheduler and the EMA."""

import io
import math
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402

from shared.config import LR_SCHEDULERS, build  # noqa: E402
from torchdiff.optim import (  # noqa: E402
    apply_hyperparameters,
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    ema_state_dict,
    load_ema_state_dict,
)

LR = 1e-3
WARMUP, TOTAL = 4, 20
LR_END = 1e-7  # diffusers' fixed end lr of the polynomial schedule


def text2image_cfg(**values):
    base = {"dataset_name": "tiny", "pretrained_model_name_or_path": "tiny"}
    return build("text2image", "torch", {**base, **values})


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """A 64k-parameter UNet: the EMA only needs a diffusers model with many tensors."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=8,
        attention_head_dim=4,
    )


def roundtrip(obj):
    """torch.save then torch.load(weights_only=True), as a checkpoint resume does."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- optimizer ---------------------------------------------------------------------------------


def test_adamw_hyper_parameters_land_in_param_groups():
    cfg = text2image_cfg(adam_beta1=0.8, adam_beta2=0.95, adam_weight_decay=0.05, adam_epsilon=1e-6)
    model = torch.nn.Linear(4, 3)
    # learning_rate is the argument (RunPlan's, after --scale_lr), not cfg.optim.learning_rate.
    optimizer = build_optimizer(model.parameters(), cfg, learning_rate=3e-4)
    assert type(optimizer) is torch.optim.AdamW
    (group,) = optimizer.param_groups
    assert group["lr"] == 3e-4
    assert group["betas"] == (0.8, 0.95)
    assert group["weight_decay"] == 0.05
    assert group["eps"] == 1e-6


def test_8bit_adam_on_cpu_steps_with_uint8_states():
    bnb = pytest.importorskip("bitsandbytes")
    cfg = text2image_cfg(use_8bit_adam=True, adam_beta2=0.99, adam_weight_decay=0.0)
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 64)  # 8192 weights: above bitsandbytes' 4096 8-bit threshold
    optimizer = build_optimizer(model.parameters(), cfg, learning_rate=1e-2)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    (group,) = optimizer.param_groups
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (
        1e-2,
        (0.9, 0.99),
        0.0,
        1e-8,
    )
    before = model.weight.detach().clone()
    model(torch.randn(8, 128)).pow(2).mean().backward()
    optimizer.step()
    # Adam's first step moves every weight with a nonzero gradient by about lr.
    change = (model.weight.detach() - before).abs()
    assert change.max().item() == pytest.approx(1e-2, rel=0.05)
    assert optimizer.state[model.weight]["state1"].dtype == torch.uint8


def test_8bit_adam_without_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    cfg = text2image_cfg(use_8bit_adam=True)
    with pytest.raises(ImportError, match=r"--use_8bit_adam needs bitsandbytes: pip install"):
        build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg, learning_rate=1e-4)


# --- learning-rate schedules -------------------------------------------------------------------


def warmup_or(step, after):
    return step / WARMUP if step < WARMUP else after(step)


def progress(step):
    return (step - WARMUP) / (TOTAL - WARMUP)


def polynomial(step, power):
    if step > TOTAL:
        return LR_END / LR
    return ((LR - LR_END) * (1 - progress(step)) ** power + LR_END) / LR


def restarts(step, cycles):
    if progress(step) >= 1:
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * ((cycles * progress(step)) % 1.0)))


# lr / peak lr after `step` optimizer updates, written from the schedules' definitions, with
# --lr_num_cycles=3 and --lr_power=2 (only cosine_with_restarts / polynomial read them).
CLOSED_FORMS = {
    "linear": lambda s: warmup_or(s, lambda s: max(0.0, (TOTAL - s) / (TOTAL - WARMUP))),
    "cosine": lambda s: warmup_or(
        s, lambda s: max(0.0, 0.5 * (1 + math.cos(math.pi * progress(s))))
    ),
    "cosine_with_restarts": lambda s: warmup_or(s, lambda s: restarts(s, 3)),
    "polynomial": lambda s: warmup_or(s, lambda s: polynomial(s, 2.0)),
    "constant": lambda s: 1.0,  # diffusers' constant schedule ignores --lr_warmup_steps
    "constant_with_warmup": lambda s: warmup_or(s, lambda s: 1.0),
}


def schedule_cfg(name):
    return text2image_cfg(lr_scheduler=name, lr_warmup_steps=WARMUP, lr_num_cycles=3, lr_power=2.0)


def scheduled(name, param=None):
    param = param if param is not None else torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([param], schedule_cfg(name), learning_rate=LR)
    return optimizer, build_lr_scheduler(optimizer, schedule_cfg(name), max_train_steps=TOTAL)


def run_updates(optimizer, scheduler, n):
    """The lr each of the next n updates uses; the scheduler steps once per update."""
    lrs = []
    for _ in range(n):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_closed_forms_cover_every_schedule():
    assert set(CLOSED_FORMS) == set(LR_SCHEDULERS)


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_schedule_matches_closed_form(name):
    optimizer, scheduler = scheduled(name)
    lrs = run_updates(optimizer, scheduler, TOTAL + 3)  # past the end: clamped, not negative
    expected = [LR * CLOSED_FORMS[name](step) for step in range(TOTAL + 3)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-18)
    if name != "constant":
        assert lrs[0] == 0.0 and lrs[WARMUP] == pytest.approx(LR)


def test_cosine_with_restarts_restarts_lr_num_cycles_times():
    optimizer, scheduler = scheduled("cosine_with_restarts")
    lrs = run_updates(optimizer, scheduler, TOTAL)
    # 16 decay steps in 3 cycles: the lr jumps back up at the start of cycles 2 and 3.
    jumps = [s for s in range(WARMUP + 1, TOTAL) if lrs[s] > lrs[s - 1]]
    assert len(jumps) == 2


def test_polynomial_warmup_equal_to_total_is_refused():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    cfg = text2image_cfg(lr_scheduler="polynomial", lr_warmup_steps=10)
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        build_lr_scheduler(optimizer, cfg, max_train_steps=10)


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_scheduler_resume_is_exact(name):
    """A resumed run rebuilds its scheduler at the resumed step (the LR is a function of the
    step): with the same flags it continues exactly where the uninterrupted run is."""
    k = 7
    optimizer, scheduler = scheduled(name)
    uninterrupted = run_updates(optimizer, scheduler, TOTAL)

    optimizer, scheduler = scheduled(name)
    run_updates(optimizer, scheduler, k)
    saved_optimizer = roundtrip(optimizer.state_dict())

    # A fresh process: new optimizer, the checkpoint's state, a scheduler at step k.
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([param], schedule_cfg(name), learning_rate=LR)
    optimizer.load_state_dict(saved_optimizer)
    scheduler = build_lr_scheduler(
        optimizer, schedule_cfg(name), max_train_steps=TOTAL, start_step=k
    )
    assert scheduler.last_epoch == k
    resumed = run_updates(optimizer, scheduler, TOTAL - k)
    assert resumed == uninterrupted[k:]


def test_a_new_learning_rate_takes_effect_at_the_resumed_step():
    optimizer, scheduler = scheduled("linear")
    run_updates(optimizer, scheduler, 5)
    saved = roundtrip(optimizer.state_dict())
    cfg = schedule_cfg("linear")
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg, learning_rate=LR)
    optimizer.load_state_dict(saved)  # holds the old peak LR
    apply_hyperparameters(optimizer, cfg, learning_rate=2 * LR)
    build_lr_scheduler(optimizer, cfg, max_train_steps=TOTAL, start_step=5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2 * LR * CLOSED_FORMS["linear"](5))


# --- EMA ---------------------------------------------------------------------------------------


def hand_decay(n, *, max_decay, warmup, inv_gamma, power):
    """diffusers EMAModel's decay for its n-th update (n counts from 1), written out."""
    step = n - 1
    if step <= 0:
        return 0.0
    decay = 1 - (1 + step / inv_gamma) ** -power if warmup else (1 + step) / (10 + step)
    return min(decay, max_decay)


def test_no_ema_without_use_ema():
    assert build_ema(torch.nn.Linear(2, 2), text2image_cfg()) is None


@pytest.mark.parametrize("warmup", [False, True], ids=["no_warmup", "warmup"])
@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_ema_matches_hand_computed_average(warmup, foreach):
    settings = {"max_decay": 0.4, "warmup": warmup, "inv_gamma": 2.0, "power": 0.75}
    cfg = text2image_cfg(
        use_ema=True,
        ema_max_decay=settings["max_decay"],
        ema_use_warmup=warmup,
        ema_inv_gamma=settings["inv_gamma"],
        ema_power=settings["power"],
        foreach_ema=foreach,
    )
    unet = tiny_unet()
    ema = build_ema(unet, cfg)
    expected = [p.detach().double().clone() for p in unet.parameters()]
    generator = torch.Generator().manual_seed(1)
    decays = []
    for n in range(1, 9):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        ema.step(unet.parameters())
        decay = hand_decay(n, **settings)
        decays.append(decay)
        assert ema.cur_decay_value == pytest.approx(decay, rel=1e-12)
        for e, p in zip(expected, unet.parameters(), strict=True):
            e.mul_(decay).add_(p.detach().double(), alpha=1 - decay)
    assert decays[0] == 0.0 and decays[-1] == settings["max_decay"]  # both ends exercised
    assert 0 < decays[1] < settings["max_decay"]
    for shadow, e in zip(ema.shadow_params, expected, strict=True):
        torch.testing.assert_close(shadow.double(), e, rtol=1e-6, atol=1e-6)


def test_ema_save_load_round_trip_is_exact():
    cfg = text2image_cfg(
        use_ema=True, ema_max_decay=0.99, ema_use_warmup=True, ema_inv_gamma=3.0, ema_power=0.5
    )
    unet = tiny_unet(seed=0)
    ema = build_ema(unet, cfg)
    for _ in range(3):
        with torch.no_grad():
            for p in unet.parameters():
                p.mul_(0.9).add_(0.01)
        ema.step(unet.parameters())

    saved = roundtrip(ema_state_dict(ema))
    restored = build_ema(tiny_unet(seed=1), cfg)  # other weights, to be overwritten
    load_ema_state_dict(restored, saved)

    for a, b in zip(ema.shadow_params, restored.shadow_params, strict=True):
        assert torch.equal(a, b)
    assert ema.state_dict().keys() == restored.state_dict().keys()
    for key in ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup",
                "inv_gamma", "power"):  # fmt: skip
        assert getattr(restored, key) == getattr(ema, key), key
    assert restored.optimization_step == 3

    # And it continues identically.
    ema.step(unet.parameters())
    restored.step(unet.parameters())
    for a, b in zip(ema.shadow_params, restored.shadow_params, strict=True):
        assert torch.equal(a, b)


def test_ema_snapshot_is_detached_from_later_updates():
    unet = tiny_unet()
    ema = build_ema(unet, text2image_cfg(use_ema=True))
    snapshot = ema_state_dict(ema)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    ema.step(unet.parameters())
    ema.step(unet.parameters())  # the first update has decay 0: shadow = weights
    assert not torch.equal(snapshot["shadow_params"][0], ema.shadow_params[0])
    assert snapshot["optimization_step"] == 0


def test_raw_ema_state_dict_loads_with_weights_only():
    unet = tiny_unet()
    ema = build_ema(unet, text2image_cfg(use_ema=True))
    raw = roundtrip(ema.state_dict())  # diffusers' own format needs no conversion either
    restored = build_ema(tiny_unet(seed=1), text2image_cfg(use_ema=True))
    load_ema_state_dict(restored, raw)
    assert all(
        torch.equal(a, b) for a, b in zip(ema.shadow_params, restored.shadow_params, strict=True)
    )


def test_ema_load_refuses_incomplete_or_mismatched_state():
    unet = tiny_unet()
    ema = build_ema(unet, text2image_cfg(use_ema=True))
    state = ema_state_dict(ema)
    with pytest.raises(ValueError, match="missing optimization_step"):
        load_ema_state_dict(ema, {k: v for k, v in state.items() if k != "optimization_step"})
    with pytest.raises(ValueError, match="shadow parameters"):
        load_ema_state_dict(ema, {**state, "shadow_params": state["shadow_params"][:-1]})
    with pytest.raises(ValueError, match="shape"):
        shadow = [torch.zeros(1), *state["shadow_params"][1:]]
        load_ema_state_dict(ema, {**state, "shadow_params": shadow})
