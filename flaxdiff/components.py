"""The models of a flax run and what the trainer does with them outside the step: load or build
them, tokenize prompts, sample images (validation, DreamBooth class images) and export.

Three ways in, as torchdiff's `models.load_components`:

- unconditional: a randomly initialized `UNet2DModel` (`shared.model_folders.unconditional_unet_config`)
  and the DDPM schedule of `train_unconditional.py`;
- latent tasks with `--pretrained_model_name_or_path`: the pipeline folder or hub id read by
  `flaxdiff.models.convert.from_diffusers` (safetensors, `.bin` or old Flax msgpack files);
- latent tasks without it: random init from the model YAML's ``unet_config``, ``vae_config``,
  ``text_encoder_config`` and ``scheduler_config`` (``configs/models/tiny.yaml``).

The UNet is trained; the VAE and the CLIP text encoder are frozen (the step encodes images and
prompts with them, under `stop_gradient`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdiff import sampling
from flaxdiff.models import convert
from flaxdiff.models.layers import ModelOptions
from shared import diffusers_format, model_folders
from shared.config import ConfigError, TrainConfig, thaw
from shared.prompts import ClipTokenizer

GUIDANCE_SCALE = 7.5  # StableDiffusionPipeline's default, as the reference scripts sample with
CLASS_IMAGE_STEPS = 25  # class images: DPM-Solver++ (flaxdiff has no PNDM, diffusers' SD default)


@dataclasses.dataclass
class Components:
    """Everything a task needs besides data.

    Attributes:
      unet: the denoiser (UNet2DModel or UNet2DConditionModel), trained.
      vae, text_encoder: frozen, or None for the unconditional task.
      tokenizer_dir: a local folder with the tokenizer files (latent tasks).
      scheduler_config: the noise schedule (a diffusers `scheduler_config.json` dict).
      pipeline: the folder the models were read from (the export copies its other parts).
    """

    unet: nnx.Module
    vae: nnx.Module | None
    text_encoder: nnx.Module | None
    tokenizer_dir: str | None
    scheduler_config: dict[str, Any]
    pipeline: convert.FlaxPipeline | None = None

    @property
    def latent(self) -> bool:
        return self.vae is not None


def load_components(
    cfg: TrainConfig, options: ModelOptions, *, abstract: bool = False
) -> Components:
    """Loads or builds the models of `cfg`'s task (fp32 parameters, `options` for compute).

    `abstract`: shapes only (`nnx.eval_shape`; pretrained folders and hub ids read their configs,
    not their weights), for compiling a step ahead of time (`flaxdiff.plan`). No tokenizer is
    read then (`tokenizer_dir` is None): `text_length` gives the prompt length.
    """
    m = cfg.model
    if cfg.task == "unconditional":
        config = {"_class_name": "UNet2DModel", **model_folders.unconditional_unet_config(cfg)}
        unet = convert.init_model(config, options=options, seed=cfg.seed, abstract=abstract)
        return Components(unet, None, None, None, model_folders.ddpm_scheduler_config(cfg))
    tokenizer_dir = None if abstract else model_folders.tokenizer_dir(cfg)
    if m.pretrained_model_name_or_path is not None:
        load = functools.partial(convert.from_diffusers, options=options, abstract=abstract)
        pipe = load(m.pretrained_model_name_or_path, revision=m.revision, variant=m.variant)
        if not isinstance(pipe, convert.FlaxPipeline):
            raise ConfigError(
                f"--pretrained_model_name_or_path {m.pretrained_model_name_or_path} is one model, "
                "not a pipeline folder (model_index.json with unet/, vae/, text_encoder/)"
            )
        vae = pipe.models.get("vae")
        if m.pretrained_vae_name_or_path is not None:
            vae = load(m.pretrained_vae_name_or_path)
        unet = pipe["unet"]
        if cfg.task == "text2image" and m.non_ema_revision is not None:
            # As train_text_to_image.py: train from the non-EMA weights kept at another revision.
            unet = load(
                m.pretrained_model_name_or_path,
                subfolder="unet",
                revision=m.non_ema_revision,
                variant=m.variant,
            )
            pipe.models["unet"] = unet
        path = pipe.folder / "scheduler" / "scheduler_config.json"
        scheduler_config = json.loads(path.read_text())
        components = Components(
            unet, vae, pipe["text_encoder"], tokenizer_dir, scheduler_config, pipe
        )
    else:
        models = {
            name: convert.init_model(
                thaw(getattr(m, f"{name}_config")), options=options, seed=cfg.seed,
                abstract=abstract,
            )
            for name in ("unet", "vae", "text_encoder")
        }  # fmt: skip
        components = Components(
            models["unet"], models["vae"], models["text_encoder"], tokenizer_dir,
            thaw(m.scheduler_config),
        )  # fmt: skip
    if tokenizer_dir is not None:
        model_folders.check_vocab(tokenizer_dir, components.text_encoder.config.vocab_size)
    components.scheduler_config["prediction_type"] = model_folders.prediction_type(
        cfg, components.scheduler_config
    )
    return components


def text_length(cfg: TrainConfig, components: Components) -> int:
    """Tokens per prompt: ``--tokenizer_max_length``, else the text encoder's positions (77 for
    CLIP; the tokenizer's `model_max_length` equals it)."""
    return (
        cfg.prompts.tokenizer_max_length or components.text_encoder.config.max_position_embeddings
    )


class Prompts:
    """Tokenizes prompts on the host with the run's CLIP tokenizer (the ids torch gets too)."""

    def __init__(self, cfg: TrainConfig, tokenizer_dir: str):
        self.tokenizer = ClipTokenizer.from_pretrained(tokenizer_dir, subfolder=None)
        self.max_length = cfg.prompts.tokenizer_max_length or self.tokenizer.model_max_length

    def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:
        tokens = self.tokenizer(list(prompts), max_length=self.max_length)
        return {
            "input_ids": np.asarray(tokens.input_ids, np.int32),
            "attention_mask": np.asarray(tokens.attention_mask, np.int32),
        }


class TextSampler:
    """Stable Diffusion sampling with classifier-free guidance, as StableDiffusionPipeline does.

    `encode(text_state, tokens) -> (n, L, D)` runs the text encoder (weights as an argument, so
    a trained one is sampled with its current weights); `draw(unet_state, states, keys)` draws
    ``len(keys)`` images of one prompt, `states` being (2, L, D): the empty prompt's then the
    prompt's (encoded, or pre-computed with ``--pre_compute_text_embeddings``), and returns them
    (n, H, W, 3) in [0, 1]. The VAE's weights are passed in, never baked into the program.
    """

    def __init__(self, components: Components, cfg: TrainConfig, *, scheduler_name: str,
                 steps: int):  # fmt: skip
        sampler = sampling.sampler_from_config(components.scheduler_config, scheduler_name)
        use_mask = cfg.prompts.text_encoder_use_attention_mask
        timestep_labels = cfg.get("class_labels_conditioning") == "timesteps"
        # diffusers' vae_scale_factor: the VAE halves the size at every block but the last.
        size = cfg.data.resolution // 2 ** (len(components.vae.config.block_out_channels) - 1)
        channels = components.unet.config.in_channels
        unet_def = nnx.graphdef(components.unet)
        text_def = nnx.graphdef(components.text_encoder)
        vae_def, self._vae_state = nnx.split(components.vae)

        @jax.jit
        def encode(text_state, ids, mask):
            text = nnx.merge(text_def, text_state)
            return text(ids, mask if use_mask else None).last_hidden_state

        @jax.jit
        def draw(unet_state, vae_state, states, keys):
            unet = nnx.merge(unet_def, unet_state)
            vae = nnx.merge(vae_def, vae_state)
            n = keys.shape[0]
            noise = jax.vmap(lambda k: jax.random.normal(k, (size, size, channels)))(keys)
            uncond, cond = (jnp.repeat(s[None], n, axis=0) for s in states)

            def net(x, t, c):
                if not timestep_labels:
                    return unet(x, t, c)
                # Trained with --class_labels_conditioning timesteps: sampled the same way.
                return unet(x, t, c, class_labels=jnp.broadcast_to(t, x.shape[:1]))

            denoise = sampling.guided(net, cond, uncond, GUIDANCE_SCALE)
            latents = sampling.sample(denoise, noise, scheduler=sampler, num_inference_steps=steps)
            return jnp.clip(vae.images_from_latents(latents) / 2 + 0.5, 0.0, 1.0)

        self._encode, self._draw = encode, draw

    def encode(self, text_state: Any, tokens: dict[str, np.ndarray]) -> jax.Array:
        return self._encode(text_state, tokens["input_ids"], tokens["attention_mask"])

    def draw(self, unet_state: Any, states: Any, keys: jax.Array) -> jax.Array:
        return self._draw(unet_state, self._vae_state, states, keys)


def export(components: Components, unet: nnx.Module, output_dir: str | Path, *,
           save_text_encoder: bool = True, text_encoder: nnx.Module | None = None) -> Path:  # fmt: skip
    """Writes the diffusers pipeline folder (`DDPMPipeline` or `StableDiffusionPipeline`).

    `text_encoder`: the trained one (``--train_text_encoder``); default the base model's.
    """
    output_dir = Path(output_dir)
    text_encoder = text_encoder or components.text_encoder
    if components.pipeline is not None and save_text_encoder:
        trained = {"unet": unet, "text_encoder": text_encoder}
        return convert.to_diffusers(components.pipeline, output_dir, models=trained)
    with diffusers_format.staging_folder(output_dir) as staging:
        convert.write_model(unet, staging / "unet")
        (staging / "scheduler").mkdir()
        diffusers_format.atomic_write_text(
            staging / "scheduler" / "scheduler_config.json",
            json.dumps(components.scheduler_config, indent=2) + "\n",
        )
        if not components.latent:
            diffusers_format.write_model_index(
                staging,
                pipeline_class="DDPMPipeline",
                components={
                    "unet": ("diffusers", "UNet2DModel"),
                    "scheduler": ("diffusers", "DDPMScheduler"),
                },
            )
        else:
            convert.write_model(components.vae, staging / "vae")
            if save_text_encoder:
                convert.write_model(text_encoder, staging / "text_encoder")
            shutil.copytree(components.tokenizer_dir, staging / "tokenizer")
            diffusers_format.write_model_index(
                staging,
                pipeline_class="StableDiffusionPipeline",
                components={
                    "unet": ("diffusers", "UNet2DConditionModel"),
                    "vae": ("diffusers", "AutoencoderKL"),
                    "text_encoder": ("transformers", "CLIPTextModel")
                    if save_text_encoder
                    else None,
                    "tokenizer": ("transformers", "CLIPTokenizer"),
                    "scheduler": ("diffusers", components.scheduler_config["_class_name"]),
                    "safety_checker": None,
                    "feature_extractor": None,
                },
                extra={"requires_safety_checker": False},
            )
        diffusers_format.publish_pipeline(staging, output_dir)
    return output_dir
