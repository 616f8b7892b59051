"""report.py: lr chosen on validation, tables, plots; and report.py itself imports no torch."""

from __future__ import annotations

import ast
import json
import os
import statistics

import pytest

import goat_lora.report as report


def _runs():
    rows = []
    for method, good_lr in (("goat", 1e-3), ("lora", 3e-3)):
        for lr in (1e-3, 3e-3):
            for seed in (0, 1):
                good = lr == good_lr
                rows.append(
                    {
                        "method": method,
                        "lr": lr,
                        "seed": seed,
                        "validation": 0.8 if good else 0.7,
                        "test": (0.85 if method == "goat" else 0.83) + 0.01 * seed if good else 0.5,
                        "trainable_percent": 2.0,
                        "step_time_s": 0.1,
                        "peak_memory_mb": 500.0,
                        "wall_time_s": 3.0,
                        "router": {"balance": 0.9} if method == "goat" else {},
                    }
                )
    return rows


def test_summarize_picks_the_lr_on_validation_and_reports_test():
    methods = report.summarize(_runs())
    assert [p["lr"] for p in methods["goat"]["per_seed"]] == [1e-3, 1e-3]
    assert [p["lr"] for p in methods["lora"]["per_seed"]] == [3e-3, 3e-3]
    assert abs(methods["goat"]["test_mean"] - 0.855) < 1e-12
    assert abs(methods["goat"]["test_std"] - 0.0070710678) < 1e-6
    assert methods["goat"]["seeds"] == 2


def test_each_seed_picks_its_own_learning_rate():
    runs = [
        {"method": "goat", "lr": lr, "seed": seed, "validation": v, "test": t}
        for lr, seed, v, t in [(1e-3, 0, 0.9, 0.80), (3e-3, 0, 0.7, 0.99), (1e-3, 1, 0.6, 0.70), (3e-3, 1, 0.8, 0.75)]
    ]
    row = report.summarize(runs)["goat"]
    assert [(p["seed"], p["lr"], p["test"]) for p in row["per_seed"]] == [(0, 1e-3, 0.80), (1, 3e-3, 0.75)]
    assert row["test_mean"] == pytest.approx(0.775)


def test_confidence_interval_and_paired_difference_match_a_t_table():
    """Three seeds: the 95% CI of a mean is mean ± t(0.975, 2) s / sqrt(3) with t = 4.302653 (a t table)."""
    tests = {"goat": [0.80, 0.82, 0.84], "lora": [0.78, 0.83, 0.79]}
    runs = [
        {"method": m, "lr": 1e-3, "seed": s, "validation": 0.5, "test": t}
        for m, values in tests.items()
        for s, t in enumerate(values)
    ]
    rows = report.summarize(runs, reference="goat", baseline=0.6)
    half = 4.302653 * 0.02 / 3**0.5
    assert rows["goat"]["test_ci"] == pytest.approx([0.82 - half, 0.82 + half], abs=1e-6)
    vs = rows["lora"]["vs_reference"]
    diffs = [0.02, -0.01, 0.05]
    mean, sd = sum(diffs) / 3, statistics.stdev(diffs)
    assert vs["mean"] == pytest.approx(mean) and vs["ci"] == pytest.approx(
        [mean - 4.302653 * sd / 3**0.5, mean + 4.302653 * sd / 3**0.5], abs=1e-6
    )
    assert (vs["wins"], vs["ties"], vs["losses"]) == (2, 0, 1)
    assert not rows["lora"]["flagged"] and "vs_reference" not in rows["goat"]


def test_rows_that_never_beat_the_constant_prediction_are_flagged():
    runs = [
        {"method": "head", "lr": lr, "seed": s, "validation": 0.66, "test": 0.658}
        for lr in (1e-2, 3e-2)
        for s in (0, 1)
    ]
    runs += [{"method": "goat", "lr": 1e-3, "seed": s, "validation": 0.8, "test": 0.8} for s in (0, 1)]
    rows = report.summarize(runs, reference="goat", baseline=0.658)
    assert rows["head"]["flagged"] and not rows["goat"]["flagged"]
    table = report.markdown_table(rows, "accuracy", baseline=0.658, baseline_name="majority class", reference="goat")
    assert "| head | " in table and "⚑" in table and "never beat the majority class" in table


def test_summarize_picks_the_lowest_validation_value_for_an_error_metric():
    runs = [{**r, "validation": 1.0 - r["validation"]} for r in _runs()]  # an error: lower is better
    methods = report.summarize(runs, lower_is_better=True)
    assert methods["goat"]["per_seed"][0]["lr"] == 1e-3 and methods["lora"]["per_seed"][0]["lr"] == 3e-3
    flipped = report.summarize(runs)  # read as "higher is better", the other rate wins
    assert flipped["goat"]["per_seed"][0]["lr"] == 3e-3


def test_compare_report_files(tmp_path):
    settings = {
        "command": "goat compare --methods goat lora",
        "date": "today",
        "machine": "test",
        "data": "x",
        "seeds": [0, 1],
        "metric": "accuracy",
        "baseline_name": "majority class",
        "reference": "goat",
    }
    report.write_compare_report(str(tmp_path), _runs(), settings, {"accuracy": 0.66})
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["methods"]) == {"goat", "lora"}
    text = (tmp_path / "report.md").read_text()
    assert "| goat | " in text and "**0.8550 ± 0.0071**" in text and "goat compare --methods goat lora" in text
    assert "Majority class (accuracy) on test: 0.6600." in text
    assert (tmp_path / "compare.png").stat().st_size > 1000
    assert (tmp_path / "rates.png").stat().st_size > 1000 and "![rates](rates.png)" in text


def test_summarize_gives_every_rate_its_mean_over_seeds():
    methods = report.summarize(_runs())
    goat = {p["lr"]: p for p in methods["goat"]["per_rate"]}
    assert sorted(goat) == [1e-3, 3e-3]
    assert goat[1e-3]["test_mean"] == pytest.approx(0.855) and goat[1e-3]["seeds"] == 2
    assert goat[3e-3]["test_mean"] == pytest.approx(0.5) and goat[3e-3]["validation_mean"] == pytest.approx(0.7)
    low, high = goat[1e-3]["test_ci"]
    assert low < 0.855 < high


def test_one_rate_per_row_draws_no_rate_plot(tmp_path):
    runs = [r for r in _runs() if r["lr"] == 1e-3]
    report.write_compare_report(str(tmp_path), runs, {"metric": "accuracy", "reference": "goat"})
    assert (tmp_path / "compare.png").is_file() and not (tmp_path / "rates.png").exists()
    assert "rates.png" not in (tmp_path / "report.md").read_text()


def test_run_plots(tmp_path):
    metrics = {
        "method": "goat",
        "test_accuracy": 0.8,
        "steps": 20,
        "train_loss": [{"step": 10, "loss": 0.7}, {"step": 20, "loss": 0.5}],
        "per_epoch_eval": [{"epoch": 1.0, "validation_accuracy": 0.7}, {"epoch": 2.0, "validation_accuracy": 0.8}],
        "expert_load": {"a.query": [0.5, 0.25, 0.25, 0.0], "a.key": [0.25] * 4},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    report.write_run_plots(str(tmp_path))
    for name in ("loss.png", "expert_load.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_report_module_does_not_import_torch():
    tree = ast.parse(open(report.__file__, encoding="utf-8").read())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "torch" not in imported


def test_study_table_has_methods_as_rows_and_an_average_column():
    def one(goat, lora, metric="accuracy"):
        runs = [
            {"method": m, "lr": 1e-3, "seed": s, "validation": 0.5, "test": v}
            for m, v in (("goat", goat), ("lora", lora))
            for s in (0, 1)
        ]
        return {"settings": {"metric": metric}, "methods": report.summarize(runs, baseline=0.5)}

    table = report.study_table({"a": one(0.8, 0.7), "b": one(0.6, 0.9, "pearson")})
    lines = table.splitlines()
    assert lines[0] == "| method | a (accuracy) | b (pearson) | average |"
    assert lines[2] == "| goat | **0.8000 ± 0.0000** | 0.6000 ± 0.0000 | 0.7000 |"
    assert lines[3] == "| lora | 0.7000 ± 0.0000 | **0.9000 ± 0.0000** | 0.8000 |"
    only_a = one(0.8, 0.7)
    only_a["methods"]["head"] = report.summarize(
        [{"method": "head", "lr": 1e-2, "seed": s, "validation": 0.5, "test": 0.55} for s in (0, 1)], baseline=0.5
    )["head"]
    lines = report.study_table({"a": only_a, "b": one(0.6, 0.9, "pearson")}).splitlines()
    assert lines[4] == "| head | 0.5500 ± 0.0000 | — | 0.5500 (1 of 2 tasks) |"


def test_best_epoch_table_counts_runs_chosen_runs_and_methods_best_before_their_last_epoch():
    def run(method, lr, seed, validation, epoch):
        return {
            "method": method,
            "lr": lr,
            "seed": seed,
            "validation": validation,
            "test": 0.6,
            "selected_epoch": epoch,
        }

    runs = [
        run("goat", 1e-3, 0, 0.7, 2.0),
        run("goat", 3e-3, 0, 0.8, 4.0),  # seed 0 chooses 3e-3: epoch 4 (last)
        run("goat", 1e-3, 1, 0.9, 3.0),
        run("goat", 3e-3, 1, 0.8, 4.0),  # seed 1 chooses 1e-3: epoch 3
        run("goat", 1e-3, 2, 0.9, 1.0),
        run("goat", 3e-3, 2, 0.5, 4.0),  # seed 2 chooses 1e-3: epoch 1
        run("lora", 1e-3, 0, 0.9, 4.0),
        run("lora", 1e-3, 1, 0.9, 4.0),
        run("lora", 1e-3, 2, 0.9, 2.0),
    ]
    new = {"settings": {"metric": "accuracy", "epochs": 4.0}, "runs": runs, "methods": report.summarize(runs)}
    old = {
        "settings": {"metric": "accuracy", "given": {"epochs": 8.0}},
        "runs": runs,
        "methods": report.summarize(runs),
    }
    unknown = {"settings": {"metric": "accuracy", "given": {}}, "runs": runs, "methods": report.summarize(runs)}
    lines = report.best_epoch_table({"a": new, "b": old, "c": unknown}).splitlines()
    # 9 runs, 4 before epoch 4; chosen: goat 4, 3, 1 (2 early), lora 4, 4, 2 (1 early); only goat mostly early
    assert lines[2] == "| a | 4 | 4 of 9 | 3 of 6 | 1 of 2 |"
    assert lines[3] == "| b | 8 | 9 of 9 | 6 of 6 | 2 of 2 |"  # older report: the epochs given on its command line
    assert lines[4] == "| c | ? | - | - | - |"


def test_rate_table_lists_every_rate_and_how_many_seeds_chose_it(tmp_path, capsys):
    report.write_compare_report(str(tmp_path), _runs(), {"metric": "accuracy", "reference": "goat"})
    assert report.main(["rates", str(tmp_path / "report.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| goat | 0.001 | 2 | 0.8550 ± " in lines[2] and lines[2].endswith("| 0.8000 | 2 |")
    assert lines[3].startswith("| goat | 0.003 | 2 | 0.5000 ± 0.0000 |") and lines[3].endswith("| 0 |")
    assert len(lines) == 2 + 4
    assert report.main(["rates"]) == 2


def _piece(tmp_path, name, runs, **settings):
    folder = tmp_path / name
    folder.mkdir()
    base = {"metric": "accuracy", "reference": "goat", "task": "classification", "data": "x", "seeds": [0, 1]}
    report.write_compare_report(str(folder), runs, {**base, **settings}, {"accuracy": 0.5})
    return str(folder / "report.json")


def test_pieces_of_a_comparison_merge_into_the_report_one_comparison_gives(tmp_path, capsys):
    """scripts/merge_comparisons.py: rows from several pieces pair by seed as in one comparison, a
    later piece's row replaces an earlier one's (the params budget after the rank budget), and pieces
    that did not train the same data are refused."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "merge_comparisons.py")
    spec = importlib.util.spec_from_file_location("merge_comparisons", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    goat = [r for r in _runs() if r["method"] == "goat"]
    lora_rank = [dict(r, rank=8) for r in _runs() if r["method"] == "lora"]
    lora_params = [dict(r, rank=12, test=r["test"] + 0.1) for r in lora_rank]
    rank = _piece(tmp_path, "rank", goat + lora_rank, budget="rank", date="2026-12-07 03:43 UTC")
    params = _piece(tmp_path, "params", lora_params, budget="params", reference="lora", date="2026-12-07 00:54 UTC")

    assert script.main([str(tmp_path / "merged"), rank, params]) == 0
    assert "row lora replaces the earlier piece's" in capsys.readouterr().out
    merged = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert list(merged["methods"]) == ["goat", "lora"] and merged["settings"]["budget"] == "params"
    assert merged["methods"]["lora"]["rank"] == 12
    expected = report.summarize(goat + lora_params, reference="goat")["lora"]["vs_reference"]
    assert merged["methods"]["lora"]["vs_reference"]["per_seed"] == expected["per_seed"]
    assert [p["rows"] for p in merged["settings"]["pieces"]] == [["goat"], ["lora"]]
    assert merged["settings"]["date"] == "2026-12-07 00:54 UTC to 2026-12-07 03:43 UTC"  # whatever the order
    assert (tmp_path / "merged" / "rates.png").is_file()

    assert script.main([str(tmp_path / "goat-only"), rank + ":goat"]) == 0
    assert list(json.loads((tmp_path / "goat-only" / "report.json").read_text())["methods"]) == ["goat"]
    other_data = _piece(tmp_path, "other", lora_params, data="y")
    with pytest.raises(SystemExit, match="data is 'y'"):
        script.main([str(tmp_path / "bad"), rank, other_data])
    assert not (tmp_path / "bad").exists()
