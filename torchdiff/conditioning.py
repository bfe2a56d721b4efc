"""Text conditioning: prompts -> CLIP hidden states for the UNet's cross-attention.

Tokenization is shared with the flax backend (`shared.prompts.ClipTokenizer`, the same ids as
transformers' CLIPTokenizer). With `--pre_compute_text_embeddings` (DreamBooth, whose prompts
are fixed) each prompt is encoded once and the text encoder leaves the accelerator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from shared.config import TrainConfig
from shared.prompts import ClipTokenizer

logger = logging.getLogger(__name__)


class TextConditioner:
    """Encodes batches of prompts with the run's tokenizer and text encoder.

    Args:
      cfg: the run config (tokenizer length, attention mask, pre-computation).
      tokenizer_dir: a local folder with the tokenizer files.
      text_encoder: a transformers CLIP text model, already on its device.
      device: where the ids go.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        tokenizer_dir: str,
        text_encoder: torch.nn.Module,
        device: torch.device,
    ):
        self.tokenizer = ClipTokenizer.from_pretrained(tokenizer_dir, subfolder=None)
        self.max_length = cfg.prompts.tokenizer_max_length or self.tokenizer.model_max_length
        self.use_attention_mask = cfg.prompts.text_encoder_use_attention_mask
        self.text_encoder = text_encoder
        self.device = device
        self._cache: dict[str, torch.Tensor] | None = None

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(list(prompts), max_length=self.max_length)
        return {
            "input_ids": torch.from_numpy(tokens.input_ids).long().to(self.device),
            "attention_mask": torch.from_numpy(tokens.attention_mask).long().to(self.device),
        }

    def _encode(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(prompts)
        mask = tokens["attention_mask"] if self.use_attention_mask else None
        return self.text_encoder(tokens["input_ids"], attention_mask=mask)[0]  # (B, L, D)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Hidden states (B, L, D); gradients flow when the text encoder is trained."""
        if self._cache is not None:
            missing = [p for p in prompts if p not in self._cache]
            if missing:
                raise KeyError(
                    f"prompts {missing} were not pre-computed (--pre_compute_text_embeddings "
                    "encodes only the instance, class and validation prompts)"
                )
            return torch.stack([self._cache[p] for p in prompts])
        return self._encode(prompts)

    def pre_compute(self, prompts: Sequence[str], *, offload_to: torch.device) -> None:
        """Encodes `prompts` once, then moves the text encoder to `offload_to` (the CPU).

        The encoder is kept (off the accelerator) because the exported pipeline needs it.
        """
        unique = list(dict.fromkeys(prompts))
        with torch.no_grad():
            states = self._encode(unique)
        self._cache = {p: s for p, s in zip(unique, states, strict=True)}
        self.text_encoder.to(offload_to)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("pre-computed the text embeddings of %d prompts", len(unique))

    @property
    def pre_computed(self) -> bool:
        return self._cache is not None
