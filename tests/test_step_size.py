"""The step-size relation of GOAT under AdamW, held by the suite at a tiny size (goat_lora.bench.step_size).

Under AdamW every trained entry moves by about lr per step, so GOAT's first-order update of the equivalent
weight, c s sum_j (dB_j A0_j + B0_j dA_j) with A0, B0 ~ 1 / sqrt(s), grows like sqrt(s) lr and its
second-order part c s sum_j dB_j dA_j like s lr^2; LoRA's first step is (alpha / r) dB A0, independent of
s and linear in lr. Each test below fails if the exponent were another (plain SGD, for one, moves GOAT's
first step like s lr, not sqrt(s) lr: see test_the_law_is_adams_not_sgds). Tolerances were measured on
this tiny problem (32 x 32, r = 8, E = 8, d = 1) and are a few times wider than what was seen (each test says what).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from goat_lora.bench import step_size

SIZE, TOKENS = 32, 64


@pytest.fixture(scope="module")
def prob():
    return step_size.problem("synthetic", SIZE, seed=0, probe_tokens=128)


BASE_ARGV = ["--weight", "synthetic", "--size", str(SIZE), "--tokens", str(TOKENS), "--probe-tokens", "128"]


def first_step(prob, method, s, lr, checkpoints=(1,)):
    return {r["N"]: r for r in step_size.run(prob, method, s, lr, step_size.parse_args(BASE_ARGV), checkpoints, seed=0)}


def test_first_step_matches_the_sign_step_prediction(prob):
    """Adam's first step is -lr sign(g): |F| = lr sqrt(sum_j (c s)^2 (m |A0_j|^2 + n |B0_j|^2)) and
    |Q| = lr^2 sqrt(m n sum_j (c s)^2) (step_size.first_step_prediction). Seen at this size: |F| within 5.5%
    for GOAT (s 4, 64, theory) and 8% for LoRA, |Q| within 2% (the rank-one terms' near-orthogonality is
    looser at n = 32; 1.5% for |F| at 384 x 384)."""
    for method, s in (("goat", 4.0), ("goat", 64.0), ("goat", None), ("lora", None)):
        row = first_step(prob, method, s, 1e-3)[1]
        assert row["first"] == pytest.approx(row["pred_first_step"], rel=0.2), (method, s)
        if method == "goat":
            assert row["second"] == pytest.approx(row["pred_second_first_step"], rel=0.1), (method, s)


def test_quadrupling_s_doubles_goats_first_step(prob):
    """The first-order part: sqrt(4) = 2 (seen 2.00 to 3 digits); the second-order part: 4 (seen 4.00)."""
    small, large = first_step(prob, "goat", 4.0, 1e-4)[1], first_step(prob, "goat", 16.0, 1e-4)[1]
    assert large["first"] / small["first"] == pytest.approx(2.0, rel=0.05)
    assert large["second"] / small["second"] == pytest.approx(4.0, rel=0.05)
    assert large["weq"] / small["weq"] == pytest.approx(2.0, rel=0.05)  # |Q| / |F| ~ 1e-3 here


def test_first_step_is_linear_in_lr_and_its_second_order_quadratic(prob):
    low, high = first_step(prob, "goat", 16.0, 1e-5)[1], first_step(prob, "goat", 16.0, 1e-4)[1]
    assert high["first"] / low["first"] == pytest.approx(10.0, rel=0.02)
    assert high["second"] / low["second"] == pytest.approx(100.0, rel=0.05)
    assert high["out"] / low["out"] == pytest.approx(10.0, rel=0.05)  # the output on the probe batch too


def test_lora_first_step_has_no_second_order_and_ignores_goats_s(prob):
    """B0 = 0 gives A no gradient at step 1: dA = 0 and Delta W = (alpha / r) dB A0, linear in lr."""
    low, high = first_step(prob, "lora", None, 1e-5)[1], first_step(prob, "lora", None, 1e-4)[1]
    assert low["second"] == 0.0 and high["second"] == 0.0
    assert high["weq"] / low["weq"] == pytest.approx(10.0, rel=1e-3)
    alpha_over_r = 16.0 / 8
    assert low["s"] == alpha_over_r


def test_the_law_is_adams_not_sgds(prob):
    """The same first step under plain SGD: the gradient on B is ~ s A0 ~ sqrt(s), so dB ~ lr sqrt(s) and
    s dB A0 ~ s lr: quadrupling s quadruples it. That is what the sqrt(s) law above would read if the
    measure or the optimizer were wrong, and the test above would then fail."""
    ratios = []
    for s in (4.0, 16.0):
        model = step_size.adapt(
            prob.weight, prob.bias, method="goat", s=s, rank=8, experts=8, top_k=2, alpha=16.0, seed=0
        )
        layer = next(model.goat_layers())
        x = torch.randn(TOKENS, SIZE, generator=torch.Generator().manual_seed(1))
        loss = (model(x) - (x @ prob.target_w.T + prob.target_b)).pow(2).mean()
        loss.backward()
        torch.optim.SGD([layer.lora_A, layer.lora_B], lr=1e-4).step()
        ratios.append(step_size.weight_terms(layer)["first"])
    assert ratios[1] / ratios[0] == pytest.approx(4.0, rel=0.05)


def test_study_fits_the_exponents_and_the_second_order_takes_over_with_steps(tmp_path, capsys):
    """End to end at a tiny size: the fitted exponents of the first- and second-order parts at N = 1
    (seen 0.50 / 1.00 and 1.00 / 2.00), and |Q| / |F| growing with N, s and lr."""
    out = tmp_path / "figures.json"
    argv = [
        *BASE_ARGV,
        "--s",
        "4",
        "16",
        "--lr",
        "1e-5",
        "1e-4",
        "1e-3",
        "--steps",
        "1",
        "4",
        "16",
        "--seeds",
        "1",
        "--json",
        str(out),
    ]
    assert step_size.main(argv) == 0
    printed = capsys.readouterr().out
    assert "LoRA-equivalent GOAT rate" in printed and "N = 16" in printed
    figures = json.loads(out.read_text())
    assert figures["config"]["theory_s"] == pytest.approx(math.sqrt(3 * SIZE / 1), rel=1e-4)
    at_1 = figures["fits"]["per_N"]["1"]
    assert at_1["first_all"]["exp_s"] == pytest.approx(0.5, abs=0.03)
    assert at_1["first_all"]["exp_lr"] == pytest.approx(1.0, abs=0.03)
    assert at_1["second_all"]["exp_s"] == pytest.approx(1.0, abs=0.05)
    assert at_1["second_all"]["exp_lr"] == pytest.approx(2.0, abs=0.05)
    ratio = figures["fits"]["ratio_second_first"]  # |Q| / |F| ~ s^0.5 lr^1 N^t with t > 0 (seen 0.5, 1.0, 0.7)
    assert ratio["exp_s"] == pytest.approx(0.5, abs=0.1) and ratio["exp_lr"] == pytest.approx(1.0, abs=0.1)
    assert ratio["exp_N"] > 0.3


def test_equivalent_rate_interpolates_in_log_log():
    rows = [{"lr": 1e-4, "out": 0.01}, {"lr": 1e-3, "out": 0.1}, {"lr": 1e-2, "out": 10.0}]
    assert step_size.equivalent_rate(rows, 0.1) == pytest.approx(1e-3)
    assert step_size.equivalent_rate(rows, 1.0) == pytest.approx(10**-2.5)  # halfway in log between 0.1 and 10
    assert step_size.equivalent_rate(rows, 0.001) is None  # below the grid
