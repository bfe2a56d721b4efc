"""The train step of flaxdiff against torchdiff's: loss, gradients and one optimizer update.

Same weights (created by torch, converted to flax), the same loader batch, the same draws (fed
through the batch, `training_pair`), for every task and objective option, in two precisions:
float64 proves the two steps compute the same function (every model in float64, the loss too:
`F64_REL`), float32 is what users see (`F32_LOSS_REL`, `F32_GRAD_REL`, measured). Errors are
relative to the reference's largest magnitude, per gradient tensor (the worst tensor counts).
"""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import training_pair as pair  # noqa: E402

from shared import demo  # noqa: E402

pytestmark = pytest.mark.slow

# float64: the same function, so rounding alone separates the two steps.
F64_REL = 1e-9
# float32, measured on this CPU (worst case of all tasks): loss 4.3e-7 (text2image), gradients
# 1.4e-5 (a transformer LayerNorm bias, DreamBooth). Bounds 7-20x above what was measured.
# (float64 measured: loss 8e-16, gradients 3e-14.)
F32_LOSS_REL = 1e-5
F32_GRAD_REL = 1e-4

B = 2  # examples per batch; prior preservation adds B class examples
DDPM_RESOLUTION, SD_RESOLUTION = 16, 32
UNCONDITIONAL = ("unconditional", ())
CASES = {
    "unconditional-epsilon": UNCONDITIONAL,
    "unconditional-v_prediction": ("unconditional", ("--prediction_type", "v_prediction")),
    "unconditional-min_snr": ("unconditional", ("--snr_gamma", "5")),
    "unconditional-noise_offset": ("unconditional", ("--noise_offset", "0.1")),
    "unconditional-input_perturbation": ("unconditional", ("--input_perturbation", "0.1")),
    "text2image": ("text2image", ()),
    "dreambooth-prior_preservation": (
        "dreambooth",
        ("--with_prior_preservation", "--prior_loss_weight", "0.5", "--offset_noise"),
    ),
    "dreambooth-train_text_encoder": (
        "dreambooth",
        ("--train_text_encoder", "--with_prior_preservation", "--snr_gamma", "5"),
    ),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> demo.DemoAssets:
    return demo.build_demo_assets(tmp_path_factory.mktemp("assets") / "assets", digits_limit=16)


@pytest.fixture(scope="module")
def sd_dir(assets, tmp_path_factory):
    return pair.write_tiny_sd(tmp_path_factory.mktemp("tiny-sd"), assets.tokenizer_dir)


def argv(task, extra, *, assets, sd_dir, out) -> list[str]:
    common = [
        "--train_batch_size", str(B), "--learning_rate", "1e-3", "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0", "--max_train_steps", "1", "--report_to", "none",
        "--output_dir", str(out), "--seed", "0",
    ]  # fmt: skip
    if task == "unconditional":
        data = ["--config", str(pair.TINY_DDPM), "--train_data_dir", str(assets.digits_dir),
                "--resolution", str(DDPM_RESOLUTION)]  # fmt: skip
    else:
        data = ["--pretrained_model_name_or_path", str(sd_dir), "--tokenizer_name",
                str(assets.tokenizer_dir), "--resolution", str(SD_RESOLUTION)]  # fmt: skip
    if task == "text2image":
        data += ["--train_data_dir", str(assets.captioned_dir)]
    elif task == "dreambooth":
        data += ["--instance_data_dir", str(assets.instance_dir),
                 "--instance_prompt", assets.instance_prompt,
                 "--class_data_dir", str(assets.class_dir), "--class_prompt", assets.class_prompt,
                 "--num_class_images", "2"]  # fmt: skip
    return [*data, *common, *extra]


def both_sides(task, args, dtype):
    float64 = dtype == "float64"
    run = pair.torch_run(task, args, float64=float64)
    side = pair.flax_side(task, args, run, float64=float64)
    batch = next(run.loader)  # the shared loader: both steps get this batch
    draws = pair.make_draws(run, batch, dtype=dtype, seed=1)
    return run, side, batch, draws


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients(case, dtype, assets, sd_dir, tmp_path, monkeypatch, request):
    if dtype == "float64":
        request.getfixturevalue("x64")
    pair.set_loss_dtype(monkeypatch, dtype)
    task, extra = CASES[case]
    started = time.perf_counter()
    args = argv(task, extra, assets=assets, sd_dir=sd_dir, out=tmp_path / "out")
    run, side, batch, draws = both_sides(task, args, dtype)

    torch_loss, torch_parts, torch_grads = pair.torch_loss_and_grads(
        run, pair.torch_batch(batch, draws)
    )
    flax_loss, flax_parts, flax_grads = pair.flax_loss_and_grads(
        side, pair.flax_batch(side, batch, draws)
    )
    assert np.dtype(jax.tree.leaves(side.parts.state["params"])[0].dtype) == np.dtype(dtype)
    loss_rel = (F64_REL, F32_LOSS_REL)[dtype == "float32"]
    grad_rel = (F64_REL, F32_GRAD_REL)[dtype == "float32"]
    loss_error = pair.relative_error(flax_loss, torch_loss)
    assert set(flax_parts) == set(torch_parts)
    part_errors = {k: pair.relative_error(flax_parts[k], torch_parts[k]) for k in torch_parts}
    grad_error, worst = pair.worst_relative_error(flax_grads, torch_grads, gradients=True)
    print(
        f"parity {case} {dtype}: loss {torch_loss:.6g} rel {loss_error:.2e}, parts "
        f"{ {k: f'{v:.2e}' for k, v in part_errors.items()} }, gradients of {len(torch_grads)} "
        f"tensors worst rel {grad_error:.2e} ({worst}), {time.perf_counter() - started:.1f} s; "
        f"{len(pair.negligible_keys(torch_grads))} tensors zero in exact arithmetic"
    )
    assert loss_error <= loss_rel, f"{case} {dtype} loss {flax_loss} vs {torch_loss}"
    for key, error in part_errors.items():
        assert error <= loss_rel, f"{case} {dtype} {key}: relative error {error:.2e}"
    assert grad_error <= grad_rel, f"{case} {dtype} gradient of {worst}: rel {grad_error:.2e}"
    if "--train_text_encoder" in extra:
        assert any(k.startswith("text_encoder.") for k in torch_grads)


# After one clipped AdamW step the weights differ by the gradient error passed through Adam,
# whose first step is lr * g / (|g| + eps): near-zero gradients are amplified by up to lr / eps.
# Measured: float64 3.2e-12, float32 7.0e-4 (relative to each tensor's largest weight).
UPDATE_REL = {"float64": F64_REL, "float32": 2e-3}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_one_optimizer_update(dtype, assets, sd_dir, tmp_path, monkeypatch, request):
    """Both trainers' steps (torchdiff `train_step`, flaxdiff's jitted `train_step`): clipped
    AdamW with weight decay and EMA, one update from the same state give the same weights."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    pair.set_loss_dtype(monkeypatch, dtype)
    extra = ("--max_grad_norm", "0.05", "--adam_weight_decay", "0.1", "--use_ema",
             "--snr_gamma", "5")  # fmt: skip
    args = argv("unconditional", extra, assets=assets, sd_dir=sd_dir, out=tmp_path / "out")
    run, side, batch, draws = both_sides("unconditional", args, dtype)
    before = {k: p.detach().numpy().copy() for k, p in pair.torch_trained(run).items()}

    logs = pair.torch_trainer.train_step(run, [pair.torch_batch(batch, draws)])
    state = {**side.parts.state, "frozen": side.parts.frozen}
    new, metrics = jax.jit(side.parts.train_step)(state, pair.flax_batch(side, batch, draws))

    assert logs["train/grad_norm"] > 0.05, "the update should be clipped"
    assert (
        pair.relative_error(metrics["train/grad_norm"], logs["train/grad_norm"])
        <= UPDATE_REL[dtype]
    )
    after_torch = {k: p.detach().numpy() for k, p in pair.torch_trained(run).items()}
    after_flax = pair.flax_as_torch(side.parts, new["params"])
    assert any(not np.array_equal(before[k], after_torch[k]) for k in before)
    error, worst = pair.worst_relative_error(after_flax, after_torch)
    ema_error, ema_worst = pair.worst_relative_error(
        pair.flax_as_torch(side.parts, {"unet": new["ema"]}), pair.torch_ema(run)
    )
    print(
        f"parity one update {dtype}: grad norm {logs['train/grad_norm']:.4g}, weights worst rel "
        f"{error:.2e} ({worst}), EMA worst rel {ema_error:.2e} ({ema_worst})"
    )
    assert error <= UPDATE_REL[dtype], f"weights after one update, {worst}: rel {error:.2e}"
    assert ema_error <= UPDATE_REL[dtype], f"EMA after one update, {ema_worst}: rel {ema_error:.2e}"
