"""The train step of every flax task: one pure function, and what it is built from.

`make_train_step` returns `train_step(state, batch) -> (state, metrics)`: one optimizer update
(accumulation over micro-batches inside), written for one device; a `parallel.Strategy`
compiles it for pmap or a mesh; `make_micro_loss` is its loss of one micro-batch (torchdiff's
`compute_loss`). `build_step` assembles it with its initial state for real models
(the trainer) or for shapes only (`flaxdiff.plan`, which compiles the same step for a TPU it does
not have), and `batch_shapes` gives the shapes of the batch the trainer feeds it.

The state holds every weight the step reads, so the compiled program takes them as arguments
instead of baking them in as constants:

    {"step", "params": {"unet", ["text_encoder"]}, "opt_state", ["ema", "ema_step"], "rng",
     "frozen": {name: {"params"?, "rest"}}}

``params`` are the trained models, ``frozen`` the weights the step never changes (the VAE, a
frozen text encoder; every model's non-parameter variables), placed with the rest but never
checkpointed. `Graph` pours a model's weights back into its graph inside the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdiff import optim, parallel
from flaxdiff.components import Components
from flaxdiff.diffusion import Objective
from shared import model_folders
from shared.config import ConfigError, TrainConfig
from shared.run.task import TaskSpec, image_channels


@dataclasses.dataclass(frozen=True)
class Graph:
    """One model as the step sees it: its graph and the templates its weights are poured into.

    The weights are not here: they ride in the state (trained ones in ``state["params"][name]``,
    frozen ones and every model's non-parameter variables in ``state["frozen"][name]``), so the
    compiled step takes them as arguments instead of baking them in as constants.
    """

    graphdef: Any
    params: Any  # nnx.State of the nnx.Param variables
    rest: Any  # nnx.State of the other variables

    @classmethod
    def of(cls, model: nnx.Module) -> tuple[Graph, dict, dict]:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(graphdef, params, rest), pure(params), pure(rest)

    def merge(self, params: dict, rest: dict) -> nnx.Module:
        return nnx.merge(self.graphdef, poured(self.params, params), poured(self.rest, rest))


def pure(state: nnx.State) -> dict:
    return state.to_pure_dict()


def poured(template: nnx.State, pure: dict) -> nnx.State:
    state = jax.tree.map(lambda x: x, template)  # a copy: the template stays untouched
    nnx.replace_by_pure_dict(state, pure)
    return state


# uint8 -> [-1, 1] as torchdiff computes it (`x / 127.5 - 1` in float32, correctly rounded), read
# from a table: XLA on a CPU divides by multiplying with a rounded reciprocal, one ulp off for 205
# of the 256 values, which the float64 parity tests of the train step see.
_UINT8_PIXELS = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def _pixels(x: jax.Array) -> jax.Array:
    """uint8 (or float in [0, 1]) NHWC -> float32 in [-1, 1], on the device."""
    if x.dtype == jnp.uint8:
        return jnp.asarray(_UINT8_PIXELS)[x]
    return x.astype(jnp.float32) * 2.0 - 1.0


def _model(graphs: dict[str, Graph], name: str, params: dict, frozen: dict) -> nnx.Module:
    """Model `name` with its weights from the state: trained (`params`) or frozen."""
    weights = params[name] if name in params else frozen[name]["params"]
    return graphs[name].merge(weights, frozen[name]["rest"])


def _given_draw(micro: dict, name: str, *, prior_preservation: bool) -> jax.Array | None:
    """A standard-normal draw (or the timesteps) that the micro-batch carries, NHWC, class rows
    after instance rows as the pixels; None when it has none."""
    if name not in micro:
        return None
    if prior_preservation:
        return jnp.concatenate([micro[name], micro[f"class_{name}"]])
    return micro[name]


def make_micro_loss(
    *, graphs: dict[str, Graph], objective: Objective, cfg, spec: TaskSpec
) -> Callable:  # fmt: skip
    """`micro_loss(params, frozen, micro, micro_step, key) -> (loss, parts)` of one micro-batch.

    The noise, timesteps and VAE posterior draws come from `key` (folded with `micro_step`),
    unless the micro-batch carries them (NHWC, per example like the pixels; ``class_<name>`` for
    the class rows): ``noise``, ``timesteps``, ``offset`` (``--noise_offset``), ``perturbation``
    (``--input_perturbation``), ``latent_noise`` (latent tasks). The parity tests feed both
    backends the same draws that way (torchdiff's `compute_loss` reads the same keys, NCHW).
    """
    use_mask = cfg.prompts.text_encoder_use_attention_mask

    def conditioning(params, frozen, micro):
        """The UNet's encoder_hidden_states for the micro-batch (instance then class rows)."""
        if "encoder_hidden_states" in micro:  # --pre_compute_text_embeddings
            states = micro["encoder_hidden_states"]
            if spec.prior_preservation:
                states = jnp.concatenate([states, micro["class_encoder_hidden_states"]])
            return states
        ids, mask = micro["input_ids"], micro["attention_mask"]
        if spec.prior_preservation:
            ids = jnp.concatenate([ids, micro["class_input_ids"]])
            mask = jnp.concatenate([mask, micro["class_attention_mask"]])
        text = _model(graphs, "text_encoder", params, frozen)
        states = text(ids, mask if use_mask else None).last_hidden_state  # (B, L, D)
        return states if spec.train_text_encoder else jax.lax.stop_gradient(states)

    def micro_loss(params, frozen, micro, micro_step, key):
        def given(name):
            return _given_draw(micro, name, prior_preservation=spec.prior_preservation)

        unet = _model(graphs, "unet", params, frozen)
        noise_key, vae_key = jax.random.split(jax.random.fold_in(key, micro_step))
        pixels = _pixels(micro["pixel_values"])  # (B, H, W, 3)
        if spec.prior_preservation:  # instance then class examples, each device its own halves
            pixels = jnp.concatenate([pixels, _pixels(micro["class_pixel_values"])])
        if spec.latent:
            vae = _model(graphs, "vae", params, frozen)
            if "latent_noise" in micro:  # DiagonalGaussian.sample's reparameterization
                posterior = vae.encode(pixels)
                z = posterior.mean + posterior.std * given("latent_noise")
                clean = model_folders.to_latents(
                    z, scaling_factor=vae.scaling_factor, shift_factor=vae.config.shift_factor
                )
            else:
                clean = vae.latents_from_images(pixels, vae_key)
            clean = jax.lax.stop_gradient(clean)
        else:
            clean = pixels
        context = conditioning(params, frozen, micro) if spec.text_conditioned else None

        def predict(noisy, timesteps):
            if context is None:
                out = unet(noisy, timesteps)
            elif spec.class_labels == "timesteps":  # DeepFloyd IF's upscaler, as torchdiff
                out = unet(noisy, timesteps, context, class_labels=timesteps)
            else:
                out = unet(noisy, timesteps, context)
            # Learned-variance UNets predict (mean, variance): train the mean half.
            return out[..., : clean.shape[-1]] if out.shape[-1] == 2 * clean.shape[-1] else out

        if "noise" in micro:
            noise = given("noise")
            # The draws' dtype is the objective's: float64 draws (parity tests) noise float64
            # samples, where float32 pixels would round the schedule to float32.
            noised = objective.noised(
                clean.astype(noise.dtype),
                noise,
                given("timesteps"),
                offset=given("offset"),
                perturbation=given("perturbation"),
            )
        else:
            noised = objective.draw(noise_key, clean)
        if spec.dream:
            noised = objective.dream(
                noised, predict, detail_preservation=cfg.diffusion.dream_detail_preservation
            )
        return objective.loss(predict(noised.noisy, noised.timesteps), noised)

    return micro_loss


def make_train_step(
    *, graphs: dict[str, Graph], objective: Objective, optimizer, strategy, cfg, spec: TaskSpec,
) -> Callable:  # fmt: skip
    """The pure `train_step(state, batch) -> (state, metrics)` of one optimizer update."""
    accumulation = cfg.training.gradient_accumulation_steps
    use_ema = cfg.ema.use_ema
    micro_loss = make_micro_loss(graphs=graphs, objective=objective, cfg=cfg, spec=spec)

    def train_step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        key = strategy.fold_in_device(key)
        frozen = state["frozen"]

        def value_and_grad(params, micro, micro_step):
            return jax.value_and_grad(micro_loss, has_aux=True)(
                params, frozen, micro, micro_step, key
            )

        (loss, parts), grads = optim.accumulate_gradients(
            value_and_grad, state["params"], batch, accumulation_steps=accumulation
        )
        loss, parts, grads = strategy.mean((loss, parts, grads))
        update = optim.apply_gradients(
            optimizer, grads, state["opt_state"], state["params"], step=state["step"], loss=loss
        )
        new = {
            **state,
            "step": state["step"] + 1,
            "params": update.params,
            "opt_state": update.opt_state,
        }
        if use_ema:  # of the UNet, as diffusers' EMAModel
            ema_step = state["ema_step"] + update.finite.astype(jnp.int32)
            moved = optim.ema_update(
                state["ema"], update.params["unet"], step=ema_step, cfg_ema=cfg.ema
            )
            new["ema"] = optim.select_tree(update.finite, moved, state["ema"])
            new["ema_step"] = ema_step
        metrics = {
            "train/loss": loss,
            "train/grad_norm": update.grad_norm,
            "train/finite": update.finite,
            **{f"train/{k}": v for k, v in parts.items()},
        }
        if use_ema:
            metrics["train/ema_decay"] = optim.ema_decay(new["ema_step"], cfg.ema)
        return new, metrics

    return train_step


@dataclasses.dataclass
class StepParts:
    """What `build_step` returns: the uncompiled step and the state it starts from.

    Attributes:
      graphs: the models' graphs (`Graph`), by name ("unet", "vae", "text_encoder").
      state: the initial host state without ``"frozen"`` (numpy, or `jax.ShapeDtypeStruct`s for
        abstract components): what a checkpoint holds.
      frozen: ``{name: {"params": ..., "rest": ...}}``: weights the step reads but never
        changes (the VAE, a frozen text encoder, every model's non-parameter variables).
      train_step: the pure step (`make_train_step`).
      optimizer: the optax transformation.
    """

    graphs: dict[str, Graph]
    state: dict[str, Any]
    frozen: dict[str, Any]
    train_step: Callable
    optimizer: Any


def _frozen_dtype(cfg: TrainConfig, weights: dict) -> dict:
    """Frozen weights in the compute dtype under ``--mixed_precision bf16``, as torchdiff casts
    its frozen VAE and text encoder to the weight dtype: half their memory on every device."""
    if cfg.training.mixed_precision != "bf16":
        return weights

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)
        return np.asarray(x).astype(jnp.bfloat16)

    return jax.tree.map(cast, weights)


def build_step(
    cfg: TrainConfig, spec: TaskSpec, components: Components, strategy: parallel.Strategy, *,
    learning_rate: float, total_steps: int, text_encoder: bool = True,
) -> StepParts:  # fmt: skip
    """The step and initial state of `cfg` for `components` (real or abstract).

    Args:
      text_encoder: False when the prompts are encoded before training
        (``--pre_compute_text_embeddings``): the step then holds no text encoder.
    """
    graphs, params, frozen = {}, {}, {}
    models = {"unet": components.unet, "vae": components.vae}
    if spec.text_conditioned and text_encoder:
        models["text_encoder"] = components.text_encoder
    for name, model in models.items():
        if model is None:
            continue
        graphs[name], weights, rest = Graph.of(model)
        trained = name == "unet" or (name == "text_encoder" and spec.train_text_encoder)
        if trained:
            params[name] = weights
            frozen[name] = {"rest": rest}
        else:
            frozen[name] = {"params": _frozen_dtype(cfg, weights), "rest": rest}
    optimizer = optim.build_optimizer(cfg, learning_rate=learning_rate, total_steps=total_steps)

    rng = np.asarray(jax.random.key_data(jax.random.key(cfg.seed)))
    leaves = jax.tree.leaves(params)
    abstract = bool(leaves) and isinstance(leaves[0], jax.ShapeDtypeStruct)

    def initial(params):
        state = {
            "step": np.int32(0),
            "params": params,
            "opt_state": optimizer.init(params),
            "rng": rng,
        }
        if cfg.ema.use_ema:  # a copy of the UNet's weights (traced: shapes only)
            state["ema"] = params["unet"] if abstract else jax.tree.map(np.array, params["unet"])
            state["ema_step"] = np.int32(0)
        return state

    state = jax.eval_shape(initial, params) if abstract else initial(params)
    train_step = make_train_step(
        graphs=graphs,
        objective=Objective.from_config(cfg, components.scheduler_config),
        optimizer=optimizer,
        strategy=strategy,
        cfg=cfg,
        spec=spec,
    )
    return StepParts(graphs, state, frozen, train_step, optimizer)


def batch_shapes(
    cfg: TrainConfig, spec: TaskSpec, components: Components, *, rows: int, text_length: int,
    embeddings: bool,
) -> dict[str, jax.ShapeDtypeStruct]:  # fmt: skip
    """The shapes of one device batch as `_shard` builds it (`rows` = accumulation x examples)."""
    size, channels = cfg.data.resolution, image_channels(spec, components.unet.config.in_channels)
    pixels = jax.ShapeDtypeStruct((rows, size, size, channels), np.uint8)
    shapes = {"pixel_values": pixels}
    if spec.prior_preservation:
        shapes["class_pixel_values"] = pixels
    if spec.text_conditioned:
        prefixes = ("", "class_") if spec.prior_preservation else ("",)
        for prefix in prefixes:
            if embeddings:
                width = components.text_encoder.config.hidden_size
                shapes[f"{prefix}encoder_hidden_states"] = jax.ShapeDtypeStruct(
                    (rows, text_length, width), np.float32
                )
            else:
                for name in ("input_ids", "attention_mask"):
                    shapes[f"{prefix}{name}"] = jax.ShapeDtypeStruct((rows, text_length), np.int32)
    return shapes


# TPU generations whose Mosaic compiler cannot build the Pallas flash kernel (bf16 matmul RHS).
_NO_FLASH = ("TPU v2", "TPU v3")


def check_attention(cfg: TrainConfig, devices: Sequence[jax.Device]) -> None:
    """`--attention flash` needs a TPU that compiles the Pallas kernel (v4 and later)."""
    if cfg.flax.attention != "flash":
        return
    kind = devices[0].device_kind if devices[0].platform == "tpu" else devices[0].platform
    if devices[0].platform != "tpu" or kind in _NO_FLASH:
        raise ConfigError(
            f"--attention flash is the Pallas TPU kernel, which needs TPU v4 or later; these "
            f"devices are {kind}: use --attention dot_product (cuDNN flash attention on GPU) or "
            "einsum"
        )
