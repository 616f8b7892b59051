"""Decoders on a causal language-modelling loss: `goat train --task causal-lm`.

    texts (--data instructions | FILE with --text-column) -> CausalLMCollator
        -> decoder (default the shipped SmolLM2-135M) adapted by GOAT -> GoatTrainer
        -> test loss / perplexity, greedy samples -> run folder (config.json, metrics.json, adapter/)

Labels are the input ids with padding set to -100 (the model shifts them by one); with
`--mask-prompt`, rows that carry a `response` field whose text ends with it get no loss on the
prompt either. The tokenizer's EOS ends every text, so the model learns where an answer stops.

`generate()` works on the adapted model (GoatModel passes it through), and a saved adapter put back
onto a fresh base (`load_causal_run`) generates the same tokens greedily.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
from dataclasses import dataclass

import torch

BUILTIN_INSTRUCTIONS = "instructions"
CAUSAL_DEFAULTS = {"epochs": 1, "batch_size": 8, "max_length": 128, "train_size": 0}
DEFAULT_CAUSAL_MODEL = "smollm2"


def instructions_path() -> str:
    """The small offline instruction set that ships with the package (scripts/make_instructions.py)."""
    return os.path.join(os.path.dirname(__file__), "data_files", "tiny_instructions.jsonl")


@dataclass
class TextSplit:
    texts: list[str]
    prompts: list[str | None]  # the prompt part of each text (instruction data), else None

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict:
        return {"text": self.texts[index], "prompt": self.prompts[index]}


def load_texts(data: str, text_column: str = "text", *, train_size: int | None = None,
               test_size: int | None = None, seed: int = 0, test_fraction: float = 0.1) -> tuple[TextSplit, TextSplit, dict]:  # fmt: skip
    """(train, test, info): texts of the built-in instruction set or a user file (.jsonl/.csv/...),
    a seeded `test_fraction` held out for the test loss and the samples."""
    from .data import _read_table

    if data == BUILTIN_INSTRUCTIONS:
        path = instructions_path()
    elif data == "finefoods":
        raise ValueError("--task causal-lm needs text data: --data instructions (built in) or a file with --text-column")
    else:
        path = data
    frame = _read_table(path)
    if text_column not in frame.columns:
        raise ValueError(
            f"data {data!r} has no text column {text_column!r}; its columns are {list(map(str, frame.columns))} "
            "(choose with --text-column)"
        )
    texts, prompts = [], []
    responses = frame["response"].tolist() if "response" in frame.columns else [None] * len(frame)
    for text, response in zip(frame[text_column].tolist(), responses):
        if text is None or (isinstance(text, float) and text != text) or not str(text).strip():
            continue
        text = str(text)
        prompt = None
        if isinstance(response, str) and response and text.endswith(response) and len(response) < len(text):
            prompt = text[: len(text) - len(response)]
        texts.append(text)
        prompts.append(prompt)
    if len(texts) < 2:
        raise ValueError(f"data {data!r} has {len(texts)} non-empty texts; need at least 2")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_test = max(1, int(round(test_fraction * len(order))))
    test_idx, train_idx = sorted(order[:n_test]), sorted(order[n_test:])
    if train_size and train_size > 0:
        train_idx = train_idx[:train_size]
    if test_size and test_size > 0:
        test_idx = test_idx[:test_size]

    def pick(indices):
        return TextSplit([texts[i] for i in indices], [prompts[i] for i in indices])

    info = {"source": os.path.abspath(path), "text_column": text_column, "test_split": f"seeded {test_fraction:.0%}"}
    return pick(train_idx), pick(test_idx), info


class CausalLMCollator:
    """Tokenises texts for a causal LM: input_ids + EOS, right padding, labels = ids with padding
    (and, with mask_prompt, the prompt) set to -100."""

    def __init__(self, tokenizer, max_length: int, mask_prompt: bool = False) -> None:
        self.tokenizer, self.max_length, self.mask_prompt = tokenizer, max_length, mask_prompt

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
        encoded = [self.encode(item["text"], item.get("prompt")) for item in batch]
        length = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(batch), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        for row, (ids, masked) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            labels[row, masked : len(ids)] = input_ids[row, masked : len(ids)]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> list[dict]:
    """Greedy continuations, one prompt at a time (no padding): [{prompt, completion, token_ids}]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        generated = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        new = generated[0, ids.shape[1] :].tolist()
        out.append({"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True), "token_ids": new})
    model.train(was_training)
    return out


@torch.no_grad()
def evaluate_loss(model, split: TextSplit, collator: CausalLMCollator, batch_size: int = 16, device="cpu") -> dict:
    """Mean token cross-entropy over the split (every label that is not -100) and its perplexity."""
    import math

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(split), batch_size):
        batch = collator([split[i] for i in range(start, min(start + batch_size, len(split)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
        )  # fmt: skip
        total += float(loss)
        count += int((shift_labels != -100).sum())
    model.train(was_training)
    mean = total / count if count else float("nan")
    return {"loss": mean, "perplexity": math.exp(mean) if count else float("nan"), "tokens": count}


def load_decoder(name_or_path: str | None):
    """(causal LM, tokenizer) for a shipped name, a local path or a hub name; one-line errors."""
    from . import hf

    name = name_or_path or DEFAULT_CAUSAL_MODEL
    try:
        model = hf.load_causal_lm(name)
        tokenizer = hf.load_tokenizer(name)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model {name!r} could not be loaded as a causal LM: {text}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _resolved(args):
    values = dataclasses.asdict(args)
    for key, value in CAUSAL_DEFAULTS.items():
        if values.get(key) is None:
            values[key] = value
    if values["model"] is None:
        values["model"] = DEFAULT_CAUSAL_MODEL
    if values["data"] == "finefoods":  # the classification default: the causal task's default is the instruction set
        values["data"] = BUILTIN_INSTRUCTIONS
    if values["lr"] is None:
        from .train import DEFAULT_LR

        values["lr"] = DEFAULT_LR[args.method]
    return type(args)(**values)


def train_causal_lm(args, output: str | None = None, *, overwrite: bool = False, quiet: bool = False,
                    save_weights: bool = True, resume_checkpoint: str | None = None,
                    requested: dict | None = None) -> dict:  # fmt: skip
    """Fine-tune a decoder with GOAT (or a baseline) on a causal LM loss; write the run folder.
    With --save-steps the Trainer checkpoints into the staging folder, and `resume_checkpoint`
    continues a killed run from one (goat_lora.resume), as for classification."""
    from transformers import set_seed

    from . import scaleout
    from .baselines import MethodSpec, count_parameters, prepare_model
    from .config import GoatConfig
    from .inject import find_target_modules
    from .train import (
        ExpertLoadCallback, _goat_config_dict, _versions, check_output, default_output,
        peak_memory_mb, reset_peak_memory, resumable_run_folder, run_trainer, run_training_arguments,
        save_method_weights, write_json,
    )  # fmt: skip

    started = time.time()
    requested = requested if requested is not None else dataclasses.asdict(args)
    args = _resolved(args)
    if args.method == "head":
        raise ValueError("--method head trains a classification head; a causal LM has none to train")
    output = output or default_output(args.method)
    check_output(output, overwrite)
    train_split, test_split, info = load_texts(
        args.data, args.text_column, train_size=args.train_size, test_size=args.test_size, seed=args.seed
    )
    set_seed(args.seed)
    model, tokenizer = load_decoder(args.model)
    targets = args.target_modules if getattr(args, "target_modules", None) else "all-linear"
    targets = find_target_modules(model, GoatConfig(target_modules=targets))
    spec = MethodSpec(rank=args.rank, experts=args.experts, top_k=args.top_k, seed=args.seed, dropout=args.dropout,
                      aux_loss_coef=args.aux_loss_coef, base_model_name_or_path=args.model)  # fmt: skip
    model = prepare_model(args.method, model, spec, targets, [])
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise ValueError("no trainable parameters")
    collator = CausalLMCollator(tokenizer, args.max_length, args.mask_prompt)

    main_process = int(os.environ.get("RANK", "0")) == 0
    with resumable_run_folder(output, main_process, args.save_steps, requested, overwrite, resume_checkpoint) as staging:
        reset_peak_memory()
        start = time.time()
        callback = ExpertLoadCallback(model)
        training_args = run_training_arguments(args, staging, quiet, eval_strategy="no")
        trainer = run_trainer(model, training_args, args, staging, callback, quiet, data_collator=collator,
                              train_dataset=train_split)  # fmt: skip
        trainer.train(resume_from_checkpoint=resume_checkpoint)
        train_time = time.time() - start
        device = training_args.device
        test = evaluate_loss(model, test_split, collator, device=device)
        prompts = [p for p in test_split.prompts if p][:3] or [t[: max(1, len(t) // 2)] for t in test_split.texts[:3]]
        samples = generate_text(model, tokenizer, prompts)
        scaleout.gather_full_parameters(model)  # FSDP2: full tensors before rank 0 saves (every rank takes part)
        history = trainer.state.log_history
        steps = callback.step_times[1:] or callback.step_times
        metrics = {
            "task": "causal-lm",
            "method": args.method,
            "test_loss": test["loss"],
            "test_perplexity": test["perplexity"],
            "test_tokens": test["tokens"],
            "samples": samples,  # greedy: prompt, completion, token_ids
            "train_loss": [
                {k: h[k] for k in ("step", "epoch", "loss", "aux_loss", "expert_balance", "learning_rate") if k in h}
                for h in history
                if "loss" in h
            ],
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100.0 * trainable / total if total else 0.0,
            "train_time_s": train_time,
            "wall_time_s": time.time() - started,
            "step_time_s": sum(steps) / len(steps) if steps else None,
            "steps": trainer.state.global_step,
            "distributed": str(trainer.accelerator.distributed_type).split(".")[-1],  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
            "processes": trainer.args.world_size,
            "peak_memory_mb": peak_memory_mb(),
            "expert_load_per_epoch": callback.per_epoch,
            "sizes": {"train": len(train_split), "test": len(test_split)},
        }
        shutil.rmtree(os.path.join(staging, ".trainer"), ignore_errors=True)
        if main_process:
            if save_weights:
                save_method_weights(model, args, os.path.join(staging, "adapter"))
            config = {
                "args": dataclasses.asdict(args),
                "task": "causal-lm",
                "data_info": info,
                "sizes": metrics["sizes"],
                "rerun": "goat train --config config.json",
                "goat_config": _goat_config_dict(model),
                "versions": _versions(),
            }
            write_json(os.path.join(staging, "config.json"), config)
            write_json(os.path.join(staging, "metrics.json"), metrics)
    metrics["output"] = os.path.abspath(output)
    return metrics


def load_causal_run(run_dir: str):
    """(GoatModel on a fresh base with the run's adapter, tokenizer, TrainArgs) from a causal-lm run."""
    import json

    from .model import GoatModel
    from .train import TrainArgs

    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as fh:
        saved = json.load(fh)
    args = TrainArgs(**saved["args"])
    base, tokenizer = load_decoder(args.model)
    model = GoatModel.from_pretrained(base, os.path.join(run_dir, "adapter"))
    model.eval()
    return model, tokenizer, args


def summary_line(metrics: dict) -> str:
    return (
        f"test loss {metrics['test_loss']:.4f} (perplexity {metrics['test_perplexity']:.2f}) | {metrics['method']} | "
        f"trainable {metrics['trainable_params']:,d} params ({metrics['trainable_percent']:.2f}%) | "
        f"{metrics['wall_time_s']:.0f} s"
    )
