"""The task protocol: what a task family tells the training engine, and nothing more.

A family (classification, regression, image-classification, qa, causal-lm) is one module with one
class that implements `Task`; `tasks/__init__.py` registers it by name. The engine (goat_lora.engine)
trains, evaluates, writes run folders, resumes and compares through this protocol alone and never
names a family:

    task.defaults(settings)              -> the family's values for the knobs left at None
    task.load_data(settings)             -> TaskData: seeded train / validation / test splits
    task.build(settings, meta)           -> ModelParts: base model with its head, collator, layers to adapt
    task.evaluate(model, split, parts, settings, device) -> Evaluation: metrics (+ per-example rows)
    task.constant_baseline(data)         -> the metrics of the best constant prediction (majority class, ...)
    task.load_eval_split(settings, source, meta) -> a whole file / data set to evaluate on

`meta` is what a run folder keeps (config.json "task_meta") so that the model can be rebuilt and
evaluated without the training data: class names, a regression target's mean and scale, ...
Metric names are listed in `metrics` (the first is the default `--metric`); metrics.json stores them
as `test_<name>` and the per-epoch validation values as `validation_<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Split:
    """Examples of one split. `inputs`: a text, a (text, text) pair, an image, or a prompt; `labels`:
    a class id, a number, or an answer text, by family."""

    inputs: list
    labels: list

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: list[int]) -> "Split":
        return Split([self.inputs[i] for i in indices], [self.labels[i] for i in indices])

    def __getitem__(self, index: int) -> dict:  # a map-style dataset for the Trainer's DataLoader
        return {"input": self.inputs[index], "labels": self.labels[index]}


@dataclass
class TaskData:
    name: str  # the --data it came from
    meta: dict  # what the model needs besides the settings: {"label_names": [...]} for classes, ...
    train: Split
    validation: Split
    test: Split
    info: dict = field(default_factory=dict)  # where each split came from, for config.json and the summary

    @property
    def label_names(self) -> list[str] | None:
        return self.meta.get("label_names")


@dataclass
class ModelParts:
    """What `Task.build` returns: everything the engine needs around the base model."""

    model: Any  # a torch module whose forward(**batch) returns .loss and .logits
    collator: Any  # list of split items -> a batch of tensors for the model (training and evaluation)
    targets: list[str]  # the layers every method adapts
    head: list[str]  # modules trained in full by every method (a fresh classification head), may be empty
    meta: dict = field(default_factory=dict)  # the TaskData.meta it was built for
    tokenizer: Any = None  # text families: the tokenizer (qa / causal-lm generate with it)


@dataclass
class Evaluation:
    metrics: dict[str, float]  # metric name (no prefix) -> value; includes "loss" where defined
    rows: list[dict] | None = None  # per-example records (qa: prompt, generation, answers) for predictions.jsonl
    extra: dict = field(default_factory=dict)  # anything else worth keeping in metrics.json (causal-lm samples)


class Task(Protocol):
    name: str
    metrics: tuple[str, ...]  # metric names, the default --metric first
    lower_is_better: frozenset[str]  # metrics where smaller wins (mse, loss, perplexity)
    baseline_name: str  # what constant_baseline predicts, for the printed summary ("majority class")
    builtin_data: tuple[str, ...]  # --data names the family resolves without files or network

    def defaults(self, settings) -> dict[str, Any]: ...

    def load_data(self, settings) -> TaskData: ...

    def build(self, settings, meta: dict) -> ModelParts: ...

    def evaluate(self, model, split: Split, parts: ModelParts, settings, device) -> Evaluation: ...

    def constant_baseline(self, data: TaskData) -> dict[str, float]: ...

    def load_eval_split(self, settings, source: str, meta: dict) -> Split: ...


def better(a: float | None, b: float | None, lower_is_better: bool) -> bool:
    """Whether metric value `a` beats `b` (None, NaN or inf never beats anything; anything beats them).
    The one rule for choosing epochs (engine.trainer.BestEpoch) and learning rates (report.summarize)."""
    import math

    def usable(value) -> bool:
        return value is not None and math.isfinite(value)

    if not usable(a):
        return False
    if not usable(b):
        return True
    return a < b if lower_is_better else a > b


def data_note(info: dict) -> str | None:
    """The line printed under a run's result: the source's own note, then every dropped-rows record."""
    notes = [info["note"]] if info.get("note") else []
    notes += [f"{d['rows']} row(s) of {d['source']!r} left out: {d['why']}" for d in info.get("dropped_rows", [])]
    return "; ".join(notes) or None


# ---- helpers every family may use ------------------------------------------------------------------
def predict(model, split: Split, collator, batch_size: int, device) -> tuple[Any, Any, float]:
    """(outputs (N, ...) float32 numpy, labels numpy, mean loss) of `model` over `split`, in order.
    `outputs` are the model's logits (a regression head: its one output per example)."""
    import numpy as np
    import torch

    was_training = model.training
    model.eval()
    outputs, labels, loss_sum = [], [], 0.0
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            batch = collator([split[i] for i in range(start, min(start + batch_size, len(split)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            outputs.append(out.logits.float().cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
            if out.loss is not None:
                loss_sum += float(out.loss) * len(batch["labels"])
    model.train(was_training)
    if not outputs:
        return np.zeros((0,)), np.zeros((0,)), float("nan")
    return np.concatenate(outputs), np.concatenate(labels), loss_sum / len(split)
