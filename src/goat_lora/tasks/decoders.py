"""What the decoder families (qa, causal-lm) share: loading a causal LM in float32 and greedy generation."""

from __future__ import annotations

import torch

from .. import hf
from .text import check_max_length, load_model, target_layers

DEFAULT_DECODER = "smollm2"


def load_decoder(settings):
    """(causal LM in float32, tokenizer with a pad token) for --model; one-line errors. float32 whatever
    the checkpoint's dtype: training float16 / bfloat16 weights without autocast or loss scaling is not
    safe (--bf16 autocasts instead)."""
    model = load_model(settings, hf.load_causal_lm, dtype=torch.float32)
    tokenizer = load_model(settings, hf.load_tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    check_max_length(settings, tokenizer, model)
    return model, tokenizer


def decoder_targets(model, settings) -> list[str]:
    """Every Linear but the output head (lm_head), or --target-modules."""
    return target_layers(model, settings, [])


def refuse_head_only(settings, task_name: str) -> None:
    if settings.method == "head":
        raise ValueError(f"--method head trains a classification head; the {task_name} task's decoder has none")


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[dict]:
    """Greedy continuations of `prompts`, batched with left padding: [{prompt, completion, token_ids}]
    (token_ids: the new tokens, up to and with the end-of-sequence token when one was generated)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens then follow every prompt directly
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            generated = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for prompt, row in zip(chunk, generated[:, encoded["input_ids"].shape[1] :].tolist()):
                if tokenizer.eos_token_id in row:  # what follows the end of sequence is padding
                    row = row[: row.index(tokenizer.eos_token_id) + 1]
                out.append(
                    {"prompt": prompt, "completion": tokenizer.decode(row, skip_special_tokens=True), "token_ids": row}
                )
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
