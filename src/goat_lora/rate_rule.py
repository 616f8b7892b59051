r"""GOAT's learning rate from a LoRA learning rate that works: the rate at which AdamW's first step moves
each adapted layer's output as far as a LoRA of the same rank moves it, divided by a margin for what
follows the first step.

Why a rule is needed. Adam moves every parameter by about lr per step whatever its gradient's size (its
first step is -lr sign(g)), so how far a step moves a layer depends on the factors it multiplies, not on
the gradient: measured in docs/results/scaling-study/ (the step-size study), GOAT's first-order move is
sqrt(s) lr, where plain gradient steps (the paper's derivation of s) would give s lr. A rate tuned for
LoRA is therefore not the rate at which GOAT moves alike; the ratio depends on s, on the layer's shape
and on the singular values its experts start from.

The first AdamW step, per unit of lr, on a layer with m outputs and n inputs, for Gaussian inputs
(the RMS change of the output per token):

    LoRA (A Kaiming-uniform, |A0|_F^2 = r/3; B0 = 0, so only B moves):
        move_LoRA = (alpha / r) sqrt(m r / 3)
    GOAT (E experts of rank d, top-k of them per token with weights about 1/k; each picked with
    probability k/E; dB_j, dA_j sign matrices):
        move_GOAT = sqrt( sum_j s_j^2 (m |A0_j|_F^2 + n |B0_j|_F^2) / (E k) )

For GOAT's init, |A0_j|_F^2 = |B0_j|_F^2 = S_j / (s rho) (S_j the sum of expert j's singular values), so
move_GOAT = sqrt(s (m + n) sum_j S_j / (rho E k)): the sqrt(s) law. Equal moves give the layer's ratio

    lr_GOAT / lr_LoRA = move_LoRA / move_GOAT

and one learning rate serves the whole model, so the rule takes the geometric mean of the layers'
ratios (their spread is reported). On MiniLM's first query layer this predicted the measured equal
rate within 1% at the first step and within 10-20% up to 16 steps (the router's own move, left out
here, adds to GOAT's). A zero-initialised B (MoLoRA) leaves only the m |A0_j|^2 term, LoRA's case.

Over a whole run the first step is not the whole story, so the rate given is the first-step-equal rate
divided by MARGIN = 3. At an equal rate GOAT's second-order move (s lr^2: dB_j dA_j, its factors start
away from zero) is a larger share of its update than LoRA's (3 to 4.5 times LoRA's share after 16 to 64
steps on that layer), and its router, which the rule leaves out, moves by about lr per step whatever s
is. On a task of 2,700 tweets, GOAT at the first-step-equal rate of LoRA's 1e-3 (1.3e-3 on MiniLM)
collapsed its routing and ended at or just above the majority class on 2 of 3 seeds (0.536, 0.543;
the majority is 0.536) where LoRA at 1e-3 reached 0.75;
at a third of it GOAT reached 0.73 (docs/results/defaults/). Since a step's second-order share grows
with lr, dividing the rate by the ratio of those shares (about 3) puts GOAT's back near LoRA's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .layer import GoatLayer


def lora_first_step_move(out_features: int, rank: int, lora_alpha: float) -> float:
    """A LoRA layer's first AdamW step per unit of lr: (alpha / r) sqrt(m r / 3)."""
    return (lora_alpha / rank) * math.sqrt(out_features * rank / 3.0)


def goat_first_step_move(init_A: torch.Tensor, init_B: torch.Tensor, expert_scale: torch.Tensor, top_k: int) -> float:
    """A GOAT layer's first AdamW step per unit of lr: sqrt(sum_j s_j^2 (m |A0_j|^2 + n |B0_j|^2) / (E k)),
    from its initial factors A0 (E d, n), B0 (m, E d) and per-expert scales s_j (E,)."""
    num_experts = expert_scale.numel()
    (out_features, total_rank), in_features = init_B.shape, init_A.shape[1]
    rank = total_rank // num_experts
    a_sq = init_A.double().reshape(num_experts, rank, in_features).pow(2).sum(dim=(1, 2))  # |A0_j|_F^2
    b_sq = init_B.double().reshape(out_features, num_experts, rank).pow(2).sum(dim=(0, 2))  # |B0_j|_F^2
    total = (expert_scale.double() ** 2 * (out_features * a_sq + in_features * b_sq)).sum()
    return math.sqrt(float(total) / (num_experts * top_k))


MARGIN = 3.0  # the first-step-equal rate over the rate given: GOAT's larger second-order move (above)


@dataclass(frozen=True)
class LoraEquivalentRate:
    """What the rule gave: GOAT's rate; the first-step ratio to LoRA's rate (geometric mean over the layers)
    and its spread; the margin the rate was divided by."""

    lr: float  # lora_lr * ratio / margin
    lora_lr: float
    ratio: float  # the first-step-equal rate / lora_lr, the geometric mean over the adapted layers
    ratio_min: float
    ratio_max: float
    margin: float
    layers: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def lora_equivalent_lr(
    model: nn.Module, lora_lr: float, lora_rank: int, lora_alpha: float, margin: float = MARGIN
) -> LoraEquivalentRate:
    """GOAT's learning rate for a model whose GOAT layers are in place, from the rate `lora_lr` that works
    for a LoRA of rank `lora_rank` and scale `lora_alpha` on the same layers: the first-step-equal rate
    divided by `margin` (1 gives the first-step-equal rate itself)."""
    ratios = []
    for layer in model.modules():
        if isinstance(layer, GoatLayer):
            goat = goat_first_step_move(layer.init_A, layer.init_B, layer.expert_scale, layer.top_k)
            lora = lora_first_step_move(layer.out_features, lora_rank, lora_alpha)
            ratios.append(lora / goat)
    if not ratios:
        raise ValueError("the learning-rate rule needs a model with GOAT layers; this one has none")
    ratio = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return LoraEquivalentRate(lora_lr * ratio / margin, lora_lr, ratio, min(ratios), max(ratios), margin, len(ratios))
