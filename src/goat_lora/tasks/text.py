"""What the text families share: a transformers sequence classifier (or regressor) with its tokenizer,
the layers to adapt, a collator that tokenises one text or a pair on the fly, and model-loading errors
in one line."""

from __future__ import annotations

import torch

from .. import hf
from ..config import GoatConfig
from ..inject import find_target_modules
from .base import ModelParts

DEFAULT_TEXT_MODEL = "minilm"


def load_model(settings, loader, *args, **kwargs):
    """`loader(settings.model, ...)` with every failure turned into one line naming the model."""
    name = settings.model
    try:
        return loader(name, *args, **kwargs)
    except FileNotFoundError:
        raise
    except ValueError as err:
        if "could not be loaded" in str(err) or "not installed" in str(err) or "not supported" in str(err):
            raise
        raise ValueError(f"model {name!r} could not be loaded: {first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - transformers raises OSError, EnvironmentError, KeyError, ...
        raise ValueError(f"model {name!r} could not be loaded: {first_line(err)}") from None


def padded_length(length: int, multiple: int, max_length: int) -> int:
    """`length` rounded up to a multiple of `multiple`, but not past max_length (nor below length)."""
    return max(length, min(-(-length // multiple) * multiple, max_length))


def pad_length(encoded: dict, length: int, tokenizer) -> dict:
    """Right-pad a tokenizer's batch (input_ids, attention_mask, token_type_ids) to `length` tokens."""
    extra = length - encoded["input_ids"].shape[1]
    if extra <= 0:
        return encoded
    fill = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) if k in fill else v for k, v in encoded.items()}


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def target_layers(model, settings, head: list[str]) -> list[str]:
    """--target-modules (names, suffixes or a regex; a miss names the adaptable layers), else every
    Linear except the head and the output embedding."""
    config = GoatConfig(
        target_modules=list(settings.target_modules) if settings.target_modules else "all-linear",
        modules_to_save=head or None,
    )
    return find_target_modules(model, config)


def check_max_length(settings, tokenizer, model) -> None:
    """Refuse a --max-length the model has no positions for (it would end in an index error deep
    inside the model's forward)."""
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is None or limit > 1_000_000:  # tokenizers without a limit report a huge number
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and settings.max_length > limit:
        raise ValueError(
            f"--max-length {settings.max_length} is more than model {settings.model!r} takes ({limit} tokens); "
            f"use --max-length {limit} or less"
        )


def sequence_model_parts(settings, meta: dict, num_labels: int, label_dtype: torch.dtype, **config) -> ModelParts:
    """A sequence classifier with a fresh head of `num_labels` outputs (1 and problem_type="regression"
    for a regressor), float32 whatever the checkpoint's dtype (--bf16 autocasts instead)."""
    model = load_model(settings, hf.load_sequence_classifier, num_labels, dtype=torch.float32, **config)
    tokenizer = load_model(settings, hf.load_tokenizer)
    check_max_length(settings, tokenizer, model)
    head = hf.default_modules_to_save(model)
    collator = TextCollator(tokenizer, settings.max_length, label_dtype, settings.pad_to_multiple)
    return ModelParts(model, collator, target_layers(model, settings, head), head, meta, tokenizer)


class TextCollator:
    """Tokenises a batch on the fly (dynamic padding, truncation to max_length; with `pad_multiple` the
    length is rounded up to a multiple of it, at most max_length). A pair (text, text) goes to the
    tokenizer as two texts, so the tokenizer adds its own separator and segment ids."""

    def __init__(
        self, tokenizer, max_length: int, label_dtype: torch.dtype = torch.long, pad_multiple: int | None = None
    ) -> None:
        self.tokenizer, self.max_length, self.label_dtype = tokenizer, max_length, label_dtype
        self.pad_multiple = pad_multiple

    def __call__(self, batch: list[dict]) -> dict:
        inputs = [item["input"] for item in batch]
        texts = [x[0] if isinstance(x, tuple) else x for x in inputs]
        pairs = [x[1] for x in inputs] if isinstance(inputs[0], tuple) else None
        encoded = self.tokenizer(
            texts, pairs, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
        )
        if self.pad_multiple:
            encoded = pad_length(
                encoded,
                padded_length(encoded["input_ids"].shape[1], self.pad_multiple, self.max_length),
                self.tokenizer,
            )
        encoded = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        encoded["labels"] = torch.tensor([item["labels"] for item in batch], dtype=self.label_dtype)
        return encoded
