"""engine/: training arguments that mean the same on transformers 4.x and 5.x."""

from __future__ import annotations

import pytest

from goat_lora.engine.trainer import training_arguments, warmup_arguments
from goat_lora.settings import RunSettings


def test_warmup_ratio_is_a_ratio_on_transformers_4_and_5():
    """Defect (a): transformers 4.x reads warmup_steps as a count (0.06 steps: no warm-up at all) and has
    warmup_ratio; transformers 5 dropped warmup_ratio and reads warmup_steps < 1 as a ratio."""
    four = {"warmup_ratio": None, "warmup_steps": None}  # the fields TrainingArguments 4.x declares
    five = {"warmup_steps": None}
    assert warmup_arguments(0.06, four) == {"warmup_ratio": 0.06}
    assert warmup_arguments(0.06, five) == {"warmup_steps": 0.06}


def test_the_installed_trainer_warms_up_over_the_ratio(tmp_path):
    args = training_arguments(
        RunSettings(batch_size=8, epochs=1, lr=1e-3, warmup_ratio=0.1, report_to="none"), str(tmp_path), quiet=True
    )
    assert args.get_warmup_steps(200) == 20
    zero = training_arguments(
        RunSettings(batch_size=8, epochs=1, lr=1e-3, warmup_ratio=0.0, report_to="none"), str(tmp_path), quiet=True
    )
    assert zero.get_warmup_steps(200) == 0


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
def test_schedule_knobs_reach_the_trainer(tmp_path, scheduler):
    settings = RunSettings(
        batch_size=8,
        epochs=1,
        lr=1e-3,
        lr_scheduler=scheduler,
        gradient_accumulation_steps=4,
        max_grad_norm=0.5,
        weight_decay=0.01,
        eval_batch_size=7,
        report_to="none",
    )
    args = training_arguments(settings, str(tmp_path), quiet=True)
    assert args.lr_scheduler_type.value == scheduler and args.gradient_accumulation_steps == 4
    assert (args.max_grad_norm, args.weight_decay, args.per_device_eval_batch_size) == (0.5, 0.01, 7)


def test_best_epoch_is_tested_and_saved(tmp_path):
    """--select best-epoch (the default): the model of the epoch with the best validation metric is the
    one tested and saved; --select last keeps the final epoch's. A learning rate that wrecks the model
    in the later epochs makes the difference visible."""
    import json

    import pandas as pd

    from goat_lora.cli import main

    words = {"great": ["tasty", "lovely", "great", "perfect"], "other": ["stale", "awful", "bland", "broken"]}
    rows = [{"text": f"{words[lab][i % 4]} snack {i}", "label": lab} for i in range(30) for lab in ("great", "other")]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    common = [
        "train",
        "--data",
        str(tmp_path / "d.csv"),
        "--max-length",
        "16",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--rank",
        "2",
        "--experts",
        "2",
        "--target-modules",
        "query",
        "value",
        "--save-steps",
        "0",
        "--report-to",
        "none",
        "--method",
        "full",
        "--lr",
        "3e-3",
        "--warmup-ratio",
        "0",
    ]
    runs = {}
    for select in ("best-epoch", "last"):
        assert main([*common, "--select", select, "--output", str(tmp_path / select)]) == 0
        runs[select] = json.loads((tmp_path / select / "metrics.json").read_text())
    history = [(e["validation_accuracy"], -e["validation_loss"]) for e in runs["last"]["per_epoch_eval"]]
    best = runs["best-epoch"]
    assert [
        (e["validation_accuracy"], -e["validation_loss"]) for e in best["per_epoch_eval"]
    ] == history  # same training
    assert best["best_epoch"] == 1 + history.index(max(history))  # the best accuracy; of equal ones, the lowest loss
    assert best["selected_epoch"] == best["best_epoch"] and runs["last"]["selected_epoch"] == 3
    if best["best_epoch"] < 3:
        assert best["test_loss"] != runs["last"]["test_loss"]  # another model was tested
    assert best["validation_accuracy"] == max(history)[0] and runs["last"]["validation_accuracy"] == history[-1][0]
    # the saved model is the one tested: goat eval reproduces the best epoch's test accuracy
    assert main(["eval", "--adapter", str(tmp_path / "best-epoch"), "--output", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["test_accuracy"] == best["test_accuracy"]


def test_recipes_fill_the_papers_values_and_flags_win(capsys):
    import json

    from goat_lora.cli import main
    from goat_lora.recipes import RECIPES

    def printed(*argv):
        assert main(["train", *argv, "--print-config"]) == 0
        return json.loads(capsys.readouterr().out)

    glue = printed("--recipe", "paper-glue", "--data-config", "mrpc")
    assert {
        k: glue[k]
        for k in (
            "recipe",
            "r",
            "lora_alpha",
            "lr",
            "epochs",
            "max_length",
            "lr_scheduler",
            "warmup_ratio",
            "scaling",
            "aux_loss_coef",
        )
    } == {
        "recipe": "paper-glue",
        "r": 32,
        "lora_alpha": 64.0,
        "lr": 1e-4,
        "epochs": 10,
        "max_length": 128,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.03,
        "scaling": "goat",
        "aux_loss_coef": 1e-3,
    }
    assert glue["batch_size"] * glue["gradient_accumulation_steps"] == 256
    public = printed("--recipe", "public-glue", "--data-config", "mrpc")
    assert (public["scaling"], public["aux_loss_coef"]) == ("alpha", 0.0)  # what the public GLUE script ran
    assert (
        printed("--recipe", "public-glue", "--data-config", "mrpc", "--lr", "3e-4", "--scaling", "goat")["lr"] == 3e-4
    )
    math = RECIPES["paper-math"]  # the qa and image families resolve them the same way (tests/test_task_*.py)
    assert (math["task"], math["r"], math["lr"], math["epochs"], math["answer_type"]) == ("qa", 8, 2e-5, 5, "number")
    assert math["batch_size"] * math["gradient_accumulation_steps"] == 32
    assert RECIPES["paper-commonsense"]["eta"] == 0.1 and RECIPES["public-math"]["scaling"] == "alpha"
    assert RECIPES["paper-image"]["batch_size"] * RECIPES["paper-image"]["gradient_accumulation_steps"] == 512
    # a method's own preset survives a recipe: MoLoRA stays zero-init with alpha / d scaling
    molora = printed("--recipe", "paper-glue", "--data-config", "mrpc", "--method", "molora")
    assert (molora["init"], molora["scaling"]) == ("zero", "alpha")
    assert set(RECIPES) >= {"paper-glue", "paper-image", "paper-commonsense", "paper-math", "public-glue"}


def test_best_epoch_keeps_the_best_parameters_and_breaks_ties_by_the_validation_loss():
    from types import SimpleNamespace

    import torch

    from goat_lora.engine.trainer import BestEpoch

    layer = torch.nn.Linear(2, 1)
    frozen = torch.nn.Linear(2, 1).requires_grad_(False)
    model = torch.nn.Sequential(layer, frozen)
    best = BestEpoch(model, "accuracy", lower_is_better=False)
    history = [(0.5, 1.0), (0.7, 0.9), (0.7, 0.8), (float("nan"), 0.1), (0.6, 0.5)]  # (accuracy, loss) per epoch
    for epoch, (accuracy, loss) in enumerate(history, 1):
        with torch.no_grad():
            layer.weight.fill_(epoch)
        best.on_evaluate(
            None,
            SimpleNamespace(epoch=float(epoch), global_step=10 * epoch, is_world_process_zero=True),
            None,
            metrics={"eval_accuracy": accuracy, "eval_loss": loss},
        )
    assert (best.epoch, best.value, best.loss) == (
        3.0,
        0.7,
        0.8,
    )  # the tie at 0.7 goes to the lower loss; NaN never wins
    assert set(best.state) == {"0.weight", "0.bias"}  # trainable parameters only
    best.restore()
    assert float(layer.weight[0, 0]) == 3.0
    error = BestEpoch(model, "mse", lower_is_better=True)
    for epoch, mse in enumerate([2.0, 1.0, 1.5], 1):
        error.on_evaluate(
            None,
            SimpleNamespace(epoch=float(epoch), global_step=epoch, is_world_process_zero=True),
            None,
            metrics={"eval_mse": mse, "eval_loss": mse},
        )
    assert error.epoch == 2.0
