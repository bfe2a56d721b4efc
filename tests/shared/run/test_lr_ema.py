"""shared.run.lr and shared.run.ema: closed-form values, and agreement with diffusers' `get_scheduler`
and `EMAModel` at every update."""

import math

import numpy as np
import pytest

from shared.errors import ConfigError
from shared.run.ema import decay_from_config, ema_decay, ema_update
from shared.run.lr import (
    POLYNOMIAL_LR_END,
    check_schedule,
    learning_rate,
    learning_rates,
    lr_multiplier,
)
from shared.schema import LR_SCHEDULERS, EMAConfig, OptimConfig

TOTAL = 20
BEYOND = 6  # steps past the total: the schedules' tails (linear holds 0, polynomial holds lr_end)


def _optim(name, *, warmup, cycles=1, power=1.0):
    return OptimConfig(
        lr_scheduler=name, lr_warmup_steps=warmup, lr_num_cycles=cycles, lr_power=power
    )


def _lr_cases():
    """(name, warmup, total, num_cycles, power): every schedule with and without warmup."""
    cases = []
    for name in LR_SCHEDULERS:
        for warmup in (0, 3):
            cycles_options = (1, 3) if name in ("cosine_with_restarts", "cosine") else (1,)
            power_options = (1.0, 2.0) if name == "polynomial" else (1.0,)
            for cycles in cycles_options:
                for power in power_options:
                    cases.append((name, warmup, TOTAL, cycles, power))
    # Warmup longer than the run, and (except polynomial) as long as it: diffusers runs them.
    for name in LR_SCHEDULERS:
        cases.append((name, TOTAL + 4, TOTAL, 2, 1.5))
        if name != "polynomial":
            cases.append((name, TOTAL, TOTAL, 2, 1.0))
    return cases


def _diffusers_lrs(name, *, warmup, total, cycles, power, base_lr, steps):
    """`param_groups[0]["lr"]` before each of `steps` updates of a diffusers-scheduled SGD."""
    torch = pytest.importorskip("torch")
    optimization = pytest.importorskip("diffusers.optimization")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = optimization.get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total,
        num_cycles=cycles,
        power=power,
    )
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: a no-op that keeps torch's call-order check quiet
        scheduler.step()
    return lrs


@pytest.mark.parametrize(("name", "warmup", "total", "cycles", "power"), _lr_cases())
def test_learning_rate_matches_diffusers_at_every_update(name, warmup, total, cycles, power):
    base_lr = 3e-4
    optim = _optim(name, warmup=warmup, cycles=cycles, power=power)
    expected = _diffusers_lrs(
        name,
        warmup=warmup,
        total=total,
        cycles=cycles,
        power=power,
        base_lr=base_lr,
        steps=total + BEYOND,
    )
    for step, torch_lr in enumerate(expected):
        ours = learning_rate(optim, base_lr=base_lr, total_steps=total, step=step)
        assert math.isclose(ours, torch_lr, rel_tol=1e-12, abs_tol=0.0), (step, ours, torch_lr)
    table = learning_rates(optim, base_lr=base_lr, total_steps=total)
    assert table.shape == (total,)
    assert table.dtype == np.float64
    np.testing.assert_allclose(table, expected[:total], rtol=1e-12, atol=0.0)


def test_every_schedule_choice_is_compared():
    compared = {case[0] for case in _lr_cases()}
    assert compared == set(LR_SCHEDULERS)


def test_closed_form_values():
    def m(name, step, warmup=4, cycles=1, power=1.0, base_lr=1e-3):
        return lr_multiplier(
            name,
            step,
            warmup_steps=warmup,
            total_steps=20,
            num_cycles=cycles,
            power=power,
            base_lr=base_lr,
        )

    # Warmup is s / W for every schedule but constant, which ignores it.
    assert [m("linear", s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert m("constant_with_warmup", 2) == 0.5
    assert m("constant", 0) == 1.0
    assert m("constant", 10**6) == 1.0
    # linear: half way through the 16 decay steps is 0.5; 0 at the total and beyond.
    assert m("linear", 12) == 0.5
    assert m("linear", 20) == 0.0
    assert m("linear", 35) == 0.0
    # cosine: a half cosine whatever num_cycles says.
    assert m("cosine", 12, cycles=3) == pytest.approx(0.5, abs=1e-15)
    assert m("cosine", 20, cycles=3) == pytest.approx(0.0, abs=1e-15)
    # cosine_with_restarts, 2 cycles of 8 steps after warmup: back to 1 at step 12, 0 from the total.
    assert m("cosine_with_restarts", 8, cycles=2) == pytest.approx(0.5, abs=1e-15)
    assert m("cosine_with_restarts", 10, cycles=2) == pytest.approx(
        0.5 * (1 + math.cos(0.75 * math.pi))
    )
    assert m("cosine_with_restarts", 12, cycles=2) == 1.0
    assert m("cosine_with_restarts", 20, cycles=2) == 0.0
    # polynomial, power 2, 1e-3 -> 1e-7: a quarter of the range left at mid-decay.
    mid = m("polynomial", 12, power=2.0)
    assert mid == pytest.approx(((1e-3 - 1e-7) * 0.25 + 1e-7) / 1e-3, rel=1e-14)
    assert m("polynomial", 20) == pytest.approx(POLYNOMIAL_LR_END / 1e-3, rel=1e-14)
    assert m("polynomial", 50) == pytest.approx(POLYNOMIAL_LR_END / 1e-3, rel=1e-14)


def test_learning_rate_scales_the_multiplier():
    optim = _optim("linear", warmup=4)
    assert learning_rate(optim, base_lr=2e-4, total_steps=20, step=2) == pytest.approx(1e-4)
    assert learning_rate(optim, base_lr=2e-4, total_steps=20, step=12) == pytest.approx(1e-4)


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="--lr_scheduler='piecewise_constant'") as info:
        lr_multiplier("piecewise_constant", 0, warmup_steps=0, total_steps=10, base_lr=1e-4)
    for name in LR_SCHEDULERS:
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="--lr_scheduler"):
        check_schedule(_optim("cosine_annealing", warmup=0), base_lr=1e-4, total_steps=10)


@pytest.mark.parametrize("base_lr", [1e-7, 5e-8])
def test_polynomial_needs_a_base_lr_above_lr_end(base_lr):
    optim = _optim("polynomial", warmup=2)
    with pytest.raises(ConfigError, match="--learning_rate") as info:
        check_schedule(optim, base_lr=base_lr, total_steps=10)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="--learning_rate"):
        learning_rate(optim, base_lr=base_lr, total_steps=10, step=0)
    # diffusers refuses the same configuration when the scheduler is built.
    torch = pytest.importorskip("torch")
    optimization = pytest.importorskip("diffusers.optimization")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    with pytest.raises(ValueError, match="lr_end"):
        optimization.get_scheduler(
            "polynomial", optimizer, num_warmup_steps=2, num_training_steps=10
        )


def test_polynomial_warmup_equal_to_total_is_refused_up_front():
    optim = _optim("polynomial", warmup=10)
    with pytest.raises(ConfigError, match="--lr_warmup_steps") as info:
        check_schedule(optim, base_lr=1e-4, total_steps=10)
    assert "--max_train_steps" in str(info.value)
    with pytest.raises(ConfigError, match="--lr_warmup_steps"):
        learning_rates(optim, base_lr=1e-4, total_steps=10)
    # The failure it prevents: diffusers divides by zero when stepped after the last update.
    torch = pytest.importorskip("torch")
    optimization = pytest.importorskip("diffusers.optimization")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-4)
    scheduler = optimization.get_scheduler(
        "polynomial", optimizer, num_warmup_steps=10, num_training_steps=10
    )
    with pytest.raises(ZeroDivisionError):
        for _ in range(10):
            optimizer.step()
            scheduler.step()


def test_valid_schedules_pass_the_check():
    for name in LR_SCHEDULERS:
        check_schedule(_optim(name, warmup=3), base_lr=1e-4, total_steps=20)
        if name != "polynomial":
            check_schedule(_optim(name, warmup=20), base_lr=1e-4, total_steps=20)


def test_negative_step_is_a_bug():
    with pytest.raises(ValueError, match="negative"):
        lr_multiplier("constant", -1, warmup_steps=0, total_steps=10, base_lr=1e-4)
    with pytest.raises(ValueError, match="negative"):
        ema_decay(-1, max_decay=0.9, use_warmup=False)


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_decay_closed_form():
    assert ema_decay(0, max_decay=0.9999, use_warmup=False) == 0.0
    assert ema_decay(1, max_decay=0.9999, use_warmup=False) == 0.0
    assert ema_decay(2, max_decay=0.9999, use_warmup=False) == pytest.approx(2 / 11)
    assert ema_decay(101, max_decay=0.9999, use_warmup=False) == pytest.approx(101 / 110)
    assert ema_decay(9, max_decay=0.9999, use_warmup=True) == pytest.approx(1 - 9 ** (-2 / 3))
    assert ema_decay(9, max_decay=0.9999, use_warmup=True, inv_gamma=2.0, power=1.0) == (
        pytest.approx(1 - 1 / 5)
    )
    # The cap, the floor, and the delayed start.
    assert ema_decay(10**6, max_decay=0.999, use_warmup=False) == 0.999
    assert ema_decay(2, max_decay=0.999, use_warmup=False, min_decay=0.5) == 0.5
    assert ema_decay(5, max_decay=0.999, use_warmup=False, update_after_step=4) == 0.0
    assert ema_decay(6, max_decay=0.999, use_warmup=False, update_after_step=4) == (
        pytest.approx(2 / 11)
    )


def test_ema_update_is_diffusers_form_and_pure():
    shadow = np.array([1.0, 2.0, -3.0])
    param = np.array([0.0, 2.5, 1.0])
    before = shadow.copy()
    out = ema_update(shadow, param, 0.75)
    np.testing.assert_array_equal(out, [0.75, 2.125, -2.0])
    np.testing.assert_array_equal(shadow, before)
    np.testing.assert_array_equal(ema_update(shadow, param, 0.0), param)
    assert ema_update(shadow.astype(np.float32), param.astype(np.float32), 0.5).dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        ema_update(shadow, param[:2], 0.5)


EMA_CASES = [
    # (use_warmup, max_decay, inv_gamma, power, min_decay, update_after_step, foreach)
    (False, 0.9999, 1.0, 2 / 3, 0.0, 0, False),
    (True, 0.9999, 1.0, 2 / 3, 0.0, 0, True),
    (False, 0.6, 1.0, 2 / 3, 0.0, 0, True),  # n/(n+9) reaches 0.6 at n=14: the cap is hit
    (True, 0.7, 2.0, 0.75, 0.0, 0, False),
    (False, 0.7, 1.0, 2 / 3, 0.3, 4, False),  # floor, delayed start, cap at n=25
]


@pytest.mark.parametrize(
    ("use_warmup", "max_decay", "inv_gamma", "power", "min_decay", "after", "foreach"), EMA_CASES
)
def test_ema_matches_diffusers_ema_model(
    use_warmup, max_decay, inv_gamma, power, min_decay, after, foreach
):
    torch = pytest.importorskip("torch")
    training_utils = pytest.importorskip("diffusers.training_utils")
    rng = np.random.default_rng(7)
    shapes = [(4,), (2, 3), ()]
    # Offset from zero so a relative tolerance is meaningful for every element.
    initial = [np.asarray(rng.normal(size=shape) + 3.0) for shape in shapes]
    params = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in initial]
    ema = training_utils.EMAModel(
        params,
        decay=max_decay,
        min_decay=min_decay,
        update_after_step=after,
        use_ema_warmup=use_warmup,
        inv_gamma=inv_gamma,
        power=power,
        foreach=foreach,
    )
    shadow = [x.copy() for x in initial]
    decays = []
    for n in range(1, 31):
        values = [np.asarray(rng.normal(size=shape) + 3.0) for shape in shapes]
        with torch.no_grad():
            for p, v in zip(params, values, strict=True):
                p.copy_(torch.from_numpy(v))
        ema.step(params)
        decay = ema_decay(
            n,
            max_decay=max_decay,
            use_warmup=use_warmup,
            inv_gamma=inv_gamma,
            power=power,
            min_decay=min_decay,
            update_after_step=after,
        )
        assert decay == ema.cur_decay_value, (n, decay, ema.cur_decay_value)
        decays.append(decay)
        shadow = [ema_update(s, v, decay) for s, v in zip(shadow, values, strict=True)]
        for ours, theirs in zip(shadow, ema.shadow_params, strict=True):
            assert theirs.dtype == torch.float64
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-12, atol=0.0)
    if max_decay < 0.99:
        assert max(decays) == max_decay  # the cap was exercised
    if min_decay > 0:
        assert min_decay in decays and decays[after] == 0.0  # floor, and the delayed start


def test_decay_from_config_reads_the_flags():
    torch = pytest.importorskip("torch")
    training_utils = pytest.importorskip("diffusers.training_utils")
    cfg = EMAConfig(
        use_ema=True, ema_inv_gamma=1.5, ema_power=0.8, ema_max_decay=0.8, ema_use_warmup=True
    )
    ema = training_utils.EMAModel(
        [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))],
        decay=cfg.ema_max_decay,
        use_ema_warmup=cfg.ema_use_warmup,
        inv_gamma=cfg.ema_inv_gamma,
        power=cfg.ema_power,
    )
    for n in range(1, 40):
        assert decay_from_config(cfg, n) == ema.get_decay(n)
    assert decay_from_config(cfg, 1000) == 0.8
    plain = EMAConfig(use_ema=True, ema_max_decay=0.9999, ema_use_warmup=False)
    assert decay_from_config(plain, 11) == pytest.approx(11 / 20)
