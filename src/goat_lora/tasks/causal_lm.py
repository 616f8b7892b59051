"""`--task causal-lm`: a decoder on a language-modelling loss over whole texts.

    --data instructions (built in) | FILE with --text-column [--mask-prompt]
    metrics: perplexity, loss (mean token cross-entropy); three greedy samples in metrics.json

Labels are the input ids with padding at -100 (the model shifts them by one); with --mask-prompt,
rows that carry a `response` field whose text ends with it get no loss on the prompt either. The
tokenizer's EOS ends every text, so the model learns where an answer stops. Default model: the
shipped SmolLM2-135M.
"""

from __future__ import annotations

import math
import os

import torch

from .base import Evaluation, ModelParts, Split, TaskData
from .decoders import DEFAULT_DECODER, decoder_targets, generate_greedy, load_decoder, refuse_head_only
from .tables import note_dropped, read_table, require_columns, train_validation_test
from .text import padded_length

BUILTIN_INSTRUCTIONS = "instructions"


def instructions_path() -> str:
    """The small offline instruction set that ships with the package (scripts/make_instructions.py)."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "data_files", "tiny_instructions.jsonl")


def read_texts(path: str, text_column: str, source: str, info: dict | None = None) -> Split:
    """Texts of a table (inputs: {"text", "prompt"}; the prompt is the part before a `response`
    field the text ends with, else None). Empty texts are left out and recorded in `info`."""
    frame = read_table(path)
    require_columns(frame, {"--text-column": text_column}, source)  # refuses a missing column or no text at all
    responses = frame["response"].tolist() if "response" in frame.columns else [None] * len(frame)
    inputs = []
    for text, response in zip(frame[text_column].tolist(), responses):
        if text is None or (isinstance(text, float) and text != text) or not str(text).strip():
            continue
        text, prompt = str(text), None
        if isinstance(response, str) and response and text.endswith(response) and len(response) < len(text):
            prompt = text[: len(text) - len(response)]
        inputs.append({"text": text, "prompt": prompt})
    note_dropped(info, source, len(frame) - len(inputs), f"empty text in {text_column!r}")
    return Split(inputs, [None] * len(inputs))


class CausalLM:
    name = "causal-lm"
    metrics = ("perplexity", "loss")
    lower_is_better = frozenset({"perplexity", "loss"})
    baseline_name = "constant"
    builtin_data = (BUILTIN_INSTRUCTIONS,)

    def defaults(self, settings) -> dict:
        data = settings.data or BUILTIN_INSTRUCTIONS
        return {
            "data": data,
            "model": DEFAULT_DECODER,
            "text_column": "text",
            "epochs": 1,
            "batch_size": 8,
            "max_length": 128,
            "train_size": 0,
        }

    def _path(self, data: str) -> str:
        return instructions_path() if data == BUILTIN_INSTRUCTIONS else data

    def load_data(self, settings) -> TaskData:
        info = {"source": os.path.abspath(self._path(settings.data)), "text_column": settings.text_column}
        texts = read_texts(self._path(settings.data), settings.text_column, settings.data, info)
        if len(texts) < 3:
            raise ValueError(f"data {settings.data!r} has {len(texts)} non-empty texts; need at least 3")
        test = (
            read_texts(settings.test_data, settings.text_column, settings.test_data, info)
            if settings.test_data
            else None
        )
        train, validation, test = train_validation_test(texts, test, settings, info)
        return TaskData(settings.data, {}, train, validation, test, info)

    def build(self, settings, meta: dict) -> ModelParts:
        refuse_head_only(settings, self.name)
        model, tokenizer = load_decoder(settings)
        collator = CausalLMCollator(tokenizer, settings.max_length, settings.mask_prompt, settings.pad_to_multiple)
        return ModelParts(model, collator, decoder_targets(model, settings), [], meta, tokenizer)

    def evaluate(self, model, split: Split, parts: ModelParts, settings, device) -> Evaluation:
        loss = token_loss(model, split, parts.collator, settings.eval_batch_size, device)
        prompts = [x["prompt"] for x in split.inputs if x["prompt"]][:3]
        prompts = prompts or [x["text"][: max(1, len(x["text"]) // 2)] for x in split.inputs[:3]]
        samples = generate_greedy(model, parts.tokenizer, prompts, max_new_tokens=24)
        return Evaluation(
            {"perplexity": math.exp(loss) if loss == loss else float("nan"), "loss": loss}, extra={"samples": samples}
        )

    def constant_baseline(self, data: TaskData) -> dict:
        return {}

    def load_eval_split(self, settings, source: str, meta: dict) -> Split:
        return read_texts(self._path(source), settings.text_column, source)


class CausalLMCollator:
    """Tokenises texts for a causal LM: input_ids + EOS, right padding, labels = ids with padding
    (and, with mask_prompt, the prompt) set to -100."""

    def __init__(self, tokenizer, max_length: int, mask_prompt: bool = False, pad_multiple: int | None = None) -> None:
        self.tokenizer, self.max_length, self.mask_prompt = tokenizer, max_length, mask_prompt
        self.pad_multiple = pad_multiple  # round the padded length up to a multiple of it (at most max_length)

    def encode(self, text: str, prompt: str | None) -> tuple[list[int], int]:
        """(ids, number of leading prompt tokens to mask)."""
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        if prompt is not None and self.mask_prompt:
            head = tok(prompt)["input_ids"]
            tail = tok(text[len(prompt) :], add_special_tokens=False)["input_ids"]
            ids, masked = head + tail + eos, len(head)
        else:
            ids, masked = tok(text)["input_ids"] + eos, 0
        return ids[: self.max_length], min(masked, self.max_length)

    def __call__(self, batch: list[dict]) -> dict:
        return pad_for_causal_lm(
            [self.encode(item["input"]["text"], item["input"]["prompt"]) for item in batch],
            self.tokenizer,
            self.pad_multiple,
            self.max_length,
        )


def pad_for_causal_lm(
    encoded: list[tuple[list[int], int]], tokenizer, pad_multiple: int | None = None, max_length: int | None = None
) -> dict:
    """Right-pad (ids, n_masked) rows: input_ids, attention_mask, and labels = ids with the first
    n_masked tokens and the padding at -100 (no loss there). With `pad_multiple` the length is rounded
    up to a multiple of it, at most max_length."""
    length = max(len(ids) for ids, _ in encoded)
    if pad_multiple:
        length = padded_length(length, pad_multiple, max_length or length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    labels = torch.full((len(encoded), length), -100, dtype=torch.long)
    for row, (ids, masked) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, masked : len(ids)] = input_ids[row, masked : len(ids)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def token_loss(model, split: Split, collator, batch_size: int, device) -> float:
    """Mean cross-entropy over every token whose label is not -100 (the model's next-token shift)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(split), batch_size):
        batch = collator([split[i] for i in range(start, min(start + batch_size, len(split)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(loss)
        count += int((shift_labels != -100).sum())
    model.train(was_training)
    return total / count if count else float("nan")
