"""Captions, CLIP tokenization and DreamBooth prompts, shared by both backends.

Caption rule (one rule, used by every data source): a caption that is ``None`` or only whitespace
becomes the empty string ``""``, and a record whose caption list is empty gets ``""`` too. The
text encoder then sees ``bos, eos, pad...``: an unconditional example, the same thing
caption dropout produces, which is what fine-tuning Stable Diffusion on uncaptioned images means.
Candidates are not filtered: ``select_caption(["a dog", None], ...)`` returns ``""`` half the
time in training. Training picks a candidate uniformly at random with the caller's generator;
evaluation takes the first, as diffusers' ``train_text_to_image.py`` does.

`ClipTokenizer` rebuilds transformers' ``CLIPTokenizer`` (transformers 5, the ``tokenizers``
backed one) on the ``tokenizers`` library alone, so ``shared`` never imports torch. It gives the
same ids: NFC + whitespace collapse + lowercase, CLIP's split regex, byte-level symbols, BPE with
the ``</w>`` end-of-word suffix, ``bos ... eos`` around every prompt, and the special tokens read
the way transformers reads ``tokenizer_config.json`` / ``special_tokens_map.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.processors import RobertaProcessing

logger = logging.getLogger(__name__)

# transformers 5 `CLIPTokenizer`: the special-token alternatives come first so they stay whole.
CLIP_SPLIT_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
END_OF_WORD_SUFFIX = "</w>"
# CLIP's text encoder has 77 positions; used when a config does not name `model_max_length`.
DEFAULT_MODEL_MAX_LENGTH = 77
_SPECIAL_TOKEN_DEFAULTS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Padding = Literal["max_length", "longest", "do_not_pad"]


def clip_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )


def clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def pre_tokenize(text: str) -> list[str]:
    """CLIP's words of `text` in byte-level symbols, before BPE (what a BPE learner counts)."""
    normalized = clip_normalizer().normalize_str(text)
    return [word for word, _ in clip_pre_tokenizer().pre_tokenize_str(normalized)]


@dataclasses.dataclass(frozen=True)
class TokenizedText:
    """Token ids of a batch of prompts.

    Attributes:
      input_ids: int32 (B, L), ``bos ... eos`` then padding.
      attention_mask: int32 (B, L), 1 on real tokens (bos and eos included), 0 on padding.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray


def _as_added_token(value: Any) -> AddedToken | str | None:
    """A special token as transformers builds it from a config value (str or serialized dict)."""
    if isinstance(value, dict):
        fields = {k: v for k, v in value.items() if k in _ADDED_TOKEN_FIELDS}
        return AddedToken(**fields)
    return value


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _resolve_folder(
    name_or_path: str | Path, subfolder: str | None, revision: str | None, cache_dir: str | None
) -> Path:
    root = Path(name_or_path).expanduser()
    if not root.exists() and isinstance(name_or_path, str) and _HUB_ID.match(name_or_path):
        from huggingface_hub import snapshot_download  # slow import, only for hub ids

        patterns = [f"{subfolder}/*"] if subfolder else ["*.json", "*.txt"]
        root = Path(
            snapshot_download(
                name_or_path, allow_patterns=patterns, revision=revision, cache_dir=cache_dir
            )
        )
    candidates = [root / subfolder, root] if subfolder else [root]
    for folder in candidates:
        if (folder / "tokenizer.json").is_file() or (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        ):
            return folder
    looked = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"no CLIP tokenizer in {looked}: expected 'vocab.json' + 'merges.txt' "
        "(optionally 'tokenizer_config.json', 'special_tokens_map.json') or 'tokenizer.json'"
    )


def _read_vocab_and_merges(
    folder: Path,
) -> tuple[dict[str, int], list[tuple[str, str]], list[dict[str, Any]]]:
    """(vocab, merges, added tokens of tokenizer.json); transformers prefers tokenizer.json."""
    if (folder / "tokenizer.json").is_file():
        data = _read_json(folder / "tokenizer.json")
        model = data["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return dict(model["vocab"]), merges, list(data.get("added_tokens", []))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(ln.split()) for ln in lines if ln.strip() and not ln.startswith("#version")]
    return _read_json(folder / "vocab.json"), merges, []


class ClipTokenizer:
    """CLIP BPE tokenizer giving the same ids as transformers' ``CLIPTokenizer``.

    Build it with `from_pretrained`. Calling it on a batch of prompts returns `TokenizedText`.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        special_tokens: dict[str, AddedToken | str | None] | None = None,
        added_tokens: Sequence[AddedToken] = (),
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
        name: str = "",
    ):
        """Builds the tokenizer.

        Args:
          vocab: token -> id.
          merges: BPE merges, highest priority first.
          special_tokens: ``bos_token``/``eos_token``/``unk_token``/``pad_token`` (str or
            `AddedToken`, None for none); missing keys take CLIP's defaults.
          added_tokens: tokens of a config's ``added_tokens_decoder``, by increasing id.
          model_max_length: default length of `__call__`.
          name: where it came from, for messages.
        """
        specials = {**_SPECIAL_TOKEN_DEFAULTS, **(special_tokens or {})}
        self.name = name
        self.model_max_length = int(model_max_length)
        self._tokens = {key: None if v is None else str(v) for key, v in specials.items()}
        self._tokenizer = Tokenizer(
            BPE(
                vocab=dict(vocab),
                merges=[tuple(m) for m in merges],
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix=END_OF_WORD_SUFFIX,
                fuse_unk=False,
                unk_token=self._tokens["unk_token"],
            )
        )
        self._tokenizer.normalizer = clip_normalizer()
        self._tokenizer.pre_tokenizer = clip_pre_tokenizer()
        self._tokenizer.decoder = decoders.ByteLevel()
        # Exactly transformers' order and dedup: the config's added tokens, then each named
        # special unless its text is among those or an equal value (same str, or AddedToken with
        # the same flags) is already queued. For one text the last flags win in `add_tokens`, so
        # SD1's plain-string pad "<|endoftext|>" makes eos match only un-normalized text. A
        # plain-string special is AddedToken(special=True, normalized=False); with SD2's pad "!",
        # every "!" in a prompt becomes the bare "!" id (0), never "!</w>".
        to_add: list[AddedToken | str] = list(added_tokens)
        configured = {str(t) for t in added_tokens}
        for value in specials.values():
            if value is not None and str(value) not in configured and value not in to_add:
                to_add.append(value)
        tokens = []
        for value in to_add:
            token = AddedToken(value, special=True) if isinstance(value, str) else value
            token.special = True
            tokens.append(token)
        self._tokenizer.add_tokens(tokens)
        self.bos_token_id = self._require_id("bos_token")
        self.eos_token_id = self._require_id("eos_token")
        self.pad_token_id = (
            None if self._tokens["pad_token"] is None else self._require_id("pad_token")
        )
        self._tokenizer.post_processor = RobertaProcessing(
            (self._tokens["eos_token"], self.eos_token_id),
            (self._tokens["bos_token"], self.bos_token_id),
            trim_offsets=False,
            add_prefix_space=False,
        )
        self._warned_truncation = False

    def _require_id(self, key: str) -> int:
        token = self._tokens[key]
        token_id = None if token is None else self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.name!r}: {key} {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        subfolder: str | None = "tokenizer",
        revision: str | None = None,
        cache_dir: str | None = None,
    ) -> ClipTokenizer:
        """Loads a tokenizer folder, a model root holding ``tokenizer/``, or a hub repository.

        Args:
          name_or_path: a local folder (the tokenizer itself or a model root) or a hub id.
          subfolder: looked in first under a model root (``None``: the folder itself only).
          revision: hub revision (branch, tag or commit).
          cache_dir: hub cache folder.

        Raises:
          FileNotFoundError: no ``vocab.json`` + ``merges.txt`` or ``tokenizer.json`` found.
        """
        folder = _resolve_folder(name_or_path, subfolder, revision, cache_dir)
        vocab, merges, json_added = _read_vocab_and_merges(folder)
        config = _read_json(folder / "tokenizer_config.json")
        specials = {
            key: _as_added_token(config[key]) for key in _SPECIAL_TOKEN_DEFAULTS if key in config
        }
        if "added_tokens_decoder" in config:
            decoder = config["added_tokens_decoder"]
            added = [_as_added_token(decoder[k]) for k in sorted(decoder, key=int)]
        else:
            # Legacy layout (SD 1.x/2.x): special_tokens_map.json wins over tokenizer_config.json;
            # this is how SD2's pad token "!" takes effect.
            for key, value in _read_json(folder / "special_tokens_map.json").items():
                if key in _SPECIAL_TOKEN_DEFAULTS:
                    value = {**value, "special": True} if isinstance(value, dict) else value
                    specials[key] = _as_added_token(value)
            added = [_as_added_token(t) for t in sorted(json_added, key=lambda t: t["id"])]
        by_content = {str(t): t for t in added}
        specials = {
            k: by_content.get(str(v), v) if v is not None else None for k, v in specials.items()
        }
        # transformers saves "no limit" as 1e30; CLIP's text encoder still has 77 positions.
        max_length = config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        max_length = DEFAULT_MODEL_MAX_LENGTH if max_length > 1_000_000 else max_length
        return cls(
            vocab,
            merges,
            special_tokens=specials,
            added_tokens=added,
            model_max_length=max_length,
            name=str(folder),
        )

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def __call__(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        padding: Padding = "max_length",
        truncation: bool = True,
    ) -> TokenizedText:
        """Tokenizes a batch of prompts.

        Args:
          texts: B prompts (a single string is refused: it would be read as B characters).
          max_length: L with padding "max_length" and the truncation length; defaults to
            `model_max_length` (``--tokenizer_max_length`` overrides it).
          padding: "max_length" (to `max_length`), "longest" (to the longest in the batch) or
            "do_not_pad" (every prompt must then have the same length).
          truncation: cut prompts longer than `max_length` to ``bos, first tokens, eos``, as
            transformers does; the first cut per tokenizer logs one warning.

        Returns:
          `TokenizedText` with int32 (B, L) arrays.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a sequence of str (not one str), got {texts!r:.80}")
        if padding not in ("max_length", "longest", "do_not_pad"):
            raise ValueError(f"padding must be max_length, longest or do_not_pad, got {padding!r}")
        max_length = self.model_max_length if max_length is None else int(max_length)
        if max_length < 2:
            raise ValueError(f"max_length must leave room for bos and eos, got {max_length}")
        rows = [enc.ids for enc in self._tokenizer.encode_batch(list(texts))]
        too_long = [i for i, ids in enumerate(rows) if len(ids) > max_length]
        if too_long and truncation:
            if not self._warned_truncation:
                self._warned_truncation = True
                first = too_long[0]
                logger.warning(
                    "prompt %r... has %d tokens, truncated to max_length=%d (tokenizer %s "
                    "reports this once)",
                    texts[first][:40],
                    len(rows[first]),
                    max_length,
                    self.name or "<unnamed>",
                )
            # By hand rather than `enable_truncation`, so the Tokenizer is never mutated and one
            # instance can serve several loader threads; same ids as tokenizers' truncation.
            for i in too_long:
                rows[i] = [*rows[i][: max_length - 1], self.eos_token_id]
        elif too_long and padding == "max_length":
            raise ValueError(f"prompt {too_long[0]} is longer than max_length={max_length}")
        lengths = [len(ids) for ids in rows] or [0]
        if padding == "do_not_pad" and len(set(lengths)) > 1:
            raise ValueError(f"padding='do_not_pad' needs prompts of one length, got {lengths}")
        width = max_length if padding == "max_length" else max(lengths)
        if width > min(lengths) and self.pad_token_id is None:
            raise ValueError(f"tokenizer {self.name!r} has no pad token; use padding='do_not_pad'")
        input_ids = np.full((len(rows), width), self.pad_token_id or 0, dtype=np.int32)
        attention_mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = ids
            attention_mask[i, : len(ids)] = 1
        return TokenizedText(input_ids=input_ids, attention_mask=attention_mask)

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        """Text of one row of ids, as transformers' ``decode`` gives it (for debugging)."""
        text = self._tokenizer.decode(
            [int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens
        )
        return text.replace(END_OF_WORD_SUFFIX, " ").strip()


def clean_caption(caption: str | None) -> str:
    """The caption rule: None or whitespace-only becomes ""; anything else is kept as is."""
    if caption is None or not caption.strip():
        return ""
    return caption


def select_caption(
    captions: Sequence[str | None], *, train: bool, rng: np.random.Generator | None
) -> str:
    """The caption one example trains or evaluates with.

    Args:
      captions: the record's candidates (may be empty).
      train: pick uniformly at random with `rng`; otherwise take the first (diffusers' rule).
      rng: required when training with several candidates; one draw per such call.

    Returns:
      The chosen caption after `clean_caption`; "" for an empty list.
    """
    if len(captions) == 0:
        return ""
    index = 0
    if train and len(captions) > 1:
        if rng is None:
            raise ValueError("select_caption(train=True) needs an rng to pick among captions")
        index = int(rng.integers(len(captions)))
    return clean_caption(captions[index])


def normalize_caption_field(value: Any, *, where: str) -> tuple[str, ...]:
    """A dataset cell as a tuple of candidate captions (each passed through `clean_caption`).

    Accepts a string, a list/tuple/1-D array of strings (None items allowed), or None (no
    caption: ``()``).

    Args:
      value: the cell.
      where: what messages call the cell, e.g. "metadata.jsonl line 12, column 'text'".

    Raises:
      ValueError: any other value, naming `where`.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        return (clean_caption(value),)
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise ValueError(f"{where}: expected a 1-D array of strings, got shape {value.shape}")
    if isinstance(value, (list, tuple, np.ndarray)):
        for j, item in enumerate(value):
            if item is not None and not isinstance(item, str):
                raise ValueError(
                    f"{where}: item {j} is a {type(item).__name__} ({item!r:.60}), expected str"
                )
        return tuple(clean_caption(item) for item in value)
    raise ValueError(
        f"{where}: expected a string, a list of strings or None, "
        f"got {type(value).__name__} ({value!r:.60})"
    )


def _require_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DreamBoothPrompts:
    """The prompts of a DreamBooth run.

    Attributes:
      instance_prompt: names the subject with its identifier, e.g. "a photo of sks dog".
      class_prompt: the generic class, e.g. "a photo of a dog" (no identifier); set for prior
        preservation.
    """

    instance_prompt: str
    class_prompt: str | None = None

    def __post_init__(self):
        _require_text("instance_prompt", self.instance_prompt)
        if self.class_prompt is not None:
            _require_text("class_prompt", self.class_prompt)
            if self.class_prompt.strip() == self.instance_prompt.strip():
                raise ValueError(f"class_prompt equals instance_prompt {self.instance_prompt!r}")

    @property
    def with_prior_preservation(self) -> bool:
        return self.class_prompt is not None


@dataclasses.dataclass(frozen=True)
class PromptDataset:
    """`num_samples` copies of one prompt, to generate class images (diffusers' PromptDataset)."""

    prompt: str
    num_samples: int

    def __post_init__(self):
        if not isinstance(self.num_samples, int) or self.num_samples < 0:
            raise ValueError(f"num_samples must be an int >= 0, got {self.num_samples!r}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return {"prompt": self.prompt, "index": index}
