r"""GOAT as pure tensor functions, in the order data flows (ICML 2025, arXiv 2502.16894).

One adapted layer ``y = W0 x + b`` with ``W0`` of shape (m, n) gets E LoRA experts of rank d = r / E
and a top-k router::

        x ──► W0 - W_res ──────────────────────────────────────────────►(+)──► y
        │                                                                ▲
        ├──► G (router, n -> E) ─► softmax ─► top-k ─► renormalise = w   │
        │                                                        │       │
        └──► dropout ─► A_cat (r x n) ─► h (T x r) ─► h * (w ⊗ 1_d) ─► B_cat (m x r) ─► * s

Nothing here knows about nn.Module; layer.py wires these functions to parameters. Every
formula is the one in ../shared/GOAT_SPEC.md; the tests in tests/test_functional.py check each.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import AuxLossForm, InitMode, ScalingMode

# ------------------------------------------------------------------------------------------------
# 1. The scaling factor s
# ------------------------------------------------------------------------------------------------


def scaling_factor(mode: str, in_features: int, expert_rank: int, eta: float = 1.0, lora_alpha: float = 16.0) -> float:
    r"""The adapter scale s for one layer with n = in_features inputs and experts of rank d.

    goat (Theorem 3.5): A is Kaiming-uniform, Var(A) = 1/(3n), so the first-step equivalent gradient
    is s^2 (B B^T g + g A^T A) ~ s^2 d / (3n) g. Setting it equal to eta * g (full fine-tuning with
    a learning rate eta times LoRA's) gives  s = sqrt(3 * eta * n / d).
    alpha: s = lora_alpha / d (the public training scripts).  rslora: s = lora_alpha / sqrt(d).
    """
    mode = ScalingMode(mode)
    if mode is ScalingMode.GOAT:
        return math.sqrt(3.0 * eta * in_features / expert_rank)
    if mode is ScalingMode.ALPHA:
        return lora_alpha / expert_rank
    return lora_alpha / math.sqrt(expert_rank)


def per_expert_scales(base_scale: float, singular_values: torch.Tensor) -> torch.Tensor:
    r"""GOAT-s (paper appendix): s_j = s_0 * sqrt(sigma_0 / sigma_j), sigma_j = sum of expert j's
    singular values; ``singular_values`` is (E, d). Experts on small singular values get a larger s."""
    sigma = singular_values.double().sum(dim=1)  # (E,)
    return (base_scale * torch.sqrt(sigma[0] / sigma.clamp_min(torch.finfo(torch.float64).tiny))).float()


# ------------------------------------------------------------------------------------------------
# 2. Which singular components each expert gets
# ------------------------------------------------------------------------------------------------


def expert_component_indices(
    init: str, num_components: int, num_experts: int, expert_rank: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Indices (E, d) into the singular spectrum (descending) of a weight with h = min(m, n).

    The spectrum is cut into E segments of t = h // E components; d <= t is required.
      goat       expert j: [j t, j t + d)             the leading d of segment j
      goat_mini  expert j: [(j+1) t - d, (j+1) t)     the trailing d of segment j
      principal  expert j: [j d, (j+1) d)             the top r = E d split consecutively
      minor      expert j: [h - r + j d, h - r + (j+1) d)   the bottom r split consecutively
      random     E distinct aligned blocks of d chosen by `generator`, in ascending order
    """
    init = InitMode(init)
    segment = num_components // num_experts  # t
    if expert_rank > segment:
        raise ValueError(
            f"rank per expert d={expert_rank} is larger than the spectrum segment t=min(m, n)//E="
            f"{num_components}//{num_experts}={segment}; use r <= {segment * num_experts} for this layer"
        )
    offsets = torch.arange(expert_rank)
    experts = torch.arange(num_experts)
    total_rank = num_experts * expert_rank
    if init is InitMode.GOAT:
        starts = experts * segment
    elif init is InitMode.GOAT_MINI:
        starts = (experts + 1) * segment - expert_rank
    elif init is InitMode.PRINCIPAL:
        starts = experts * expert_rank
    elif init is InitMode.MINOR:
        starts = num_components - total_rank + experts * expert_rank
    elif init is InitMode.RANDOM:
        num_blocks = num_components // expert_rank
        starts = torch.randperm(num_blocks, generator=generator)[:num_experts].sort().values * expert_rank
    else:
        raise ValueError(f"init={init.value!r} uses no singular components")
    return starts[:, None] + offsets[None, :]  # (E, d)


# ------------------------------------------------------------------------------------------------
# 3. The singular components themselves: see svd.py (exact SVD, or the faster Gram route)
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# 4. Expert factors and the residual
# ------------------------------------------------------------------------------------------------


class ExpertFactors(NamedTuple):
    """The initial factors of all experts, concatenated along the rank axis (float32).

    Expert j owns rows [j d, (j+1) d) of ``A`` and columns [j d, (j+1) d) of ``B``.
    """

    A: torch.Tensor  # (r, n)
    B: torch.Tensor  # (m, r)
    expert_scale: torch.Tensor  # (E,): s_j (all equal to s unless GOAT-s)


def svd_expert_factors(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, expert_scale: torch.Tensor, rho: float
) -> ExpertFactors:
    r"""B_j = U_j diag(sqrt(S_j)) / sqrt(s_j rho),  A_j = diag(sqrt(S_j)) V_j^T / sqrt(s_j rho),
    so that  s_j B_j A_j = U_j diag(S_j) V_j^T / rho.  U (m, r), S (r,), V (n, r), columns grouped
    by expert; expert_scale (E,)."""
    expert_rank = S.shape[0] // expert_scale.shape[0]
    col_scale = expert_scale.to(S.dtype).repeat_interleave(expert_rank)  # (r,): s_j per column
    root = torch.sqrt(S / (col_scale * rho))  # sqrt(S_j) / sqrt(s_j rho)
    B = U * root[None, :]  # (m, r)
    A = root[:, None] * V.T  # (r, n)
    return ExpertFactors(A.float().contiguous(), B.float().contiguous(), expert_scale.float())


def zero_expert_factors(
    out_features: int, in_features: int, total_rank: int, num_experts: int, scale: float, generator: torch.Generator
) -> ExpertFactors:
    """Plain LoRA init for every expert: A Kaiming-uniform (a = sqrt(5), bound 1/sqrt(n)), B = 0."""
    A = torch.empty(total_rank, in_features)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return ExpertFactors(A, torch.zeros(out_features, total_rank), torch.full((num_experts,), float(scale)))


def residual_weight(factors: ExpertFactors, coef: float) -> torch.Tensor:
    r"""W_res = c * sum_j s_j B_j A_j  (m, n), float32. Lemma 3.3: with c = 1/E and E[w_j] = 1/E,
    the expected equivalent weight (W0 - W_res) + sum_j E[w_j] s_j B_j A_j equals W0."""
    expert_rank = factors.A.shape[0] // factors.expert_scale.shape[0]
    col_scale = factors.expert_scale.repeat_interleave(expert_rank)  # (r,)
    return coef * (factors.B * col_scale[None, :]) @ factors.A


# ------------------------------------------------------------------------------------------------
# 5. Routing
# ------------------------------------------------------------------------------------------------


class Routing(NamedTuple):
    probs: torch.Tensor  # (T, E) softmax of the router logits, float32
    topk_index: torch.Tensor  # (T, k) chosen experts
    weights: torch.Tensor  # (T, E) renormalised top-k weights, 0 for experts not chosen


def route(router_logits: torch.Tensor, top_k: int) -> Routing:
    r"""p = softmax(x G^T) in float32; keep the top-k; w = p_topk / sum(p_topk) (sums to 1)."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # (T, E)
    top_probs, topk_index = probs.topk(top_k, dim=-1)  # (T, k)
    top_weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(-1, topk_index, top_weights)  # (T, E)
    return Routing(probs, topk_index, weights)


# ------------------------------------------------------------------------------------------------
# 6. The experts' contribution: all experts in two matmuls
# ------------------------------------------------------------------------------------------------


def experts_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor, expert_scale: torch.Tensor
) -> torch.Tensor:
    r"""sum_{j in topk} w_j s_j B_j A_j x for every token, at the cost of one LoRA of rank r.

    h = x A_cat^T (T, r); each of expert j's d columns is multiplied by w_j s_j (zero when j was not
    chosen); y = h B_cat^T (T, m).
    """
    tokens, num_experts = weights.shape
    expert_rank = A.shape[0] // num_experts
    hidden = x @ A.T  # (T, r)
    expert_weights = weights * expert_scale  # (T, E): w_j s_j
    # (T, E, d) * (T, E, 1): each of expert j's d columns times w_j s_j. A broadcast instead of
    # repeat_interleave, which on CUDA reads its output size back from the GPU (a sync per layer).
    scaled = (hidden.view(tokens, num_experts, expert_rank) * expert_weights.unsqueeze(-1)).view(tokens, A.shape[0])  # (T, r)
    return scaled @ B.T  # (T, m)


def experts_delta_loop(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: Routing, expert_scale: torch.Tensor
) -> torch.Tensor:
    """Reference: a Python loop over experts with index gathers (as the public code does)."""
    num_experts = routing.weights.shape[-1]
    expert_rank = A.shape[0] // num_experts
    out = x.new_zeros(x.shape[0], B.shape[0])
    for j in range(num_experts):
        token_index, slot = torch.where(routing.topk_index == j)
        if token_index.numel() == 0:
            continue
        A_j = A[j * expert_rank : (j + 1) * expert_rank]  # (d, n)
        B_j = B[:, j * expert_rank : (j + 1) * expert_rank]  # (m, d)
        w_j = routing.weights[token_index, j][:, None]  # (T_j, 1)
        out = out.index_add(0, token_index, expert_scale[j] * w_j * ((x[token_index] @ A_j.T) @ B_j.T))
    return out


# ------------------------------------------------------------------------------------------------
# 7. Load-balancing loss
# ------------------------------------------------------------------------------------------------


class RoutingStats(NamedTuple):
    """What the load-balancing loss needs from one layer's forward; sums, so they add across
    micro-batches and processes. ``prob_sum`` carries the gradient to the router."""

    prob_sum: torch.Tensor  # (E,) sum over tokens of p_j
    counts: torch.Tensor  # (E,) number of top-k selections of j (each token makes k)
    num_tokens: torch.Tensor  # () T


def routing_stats(routing: Routing, token_mask: torch.Tensor | None = None) -> RoutingStats:
    """Sufficient statistics of one forward; `token_mask` (T,) bool drops padding tokens."""
    probs, topk_index = routing.probs, routing.topk_index
    if token_mask is not None:
        probs, topk_index = probs[token_mask], topk_index[token_mask]
    counts = torch.zeros(probs.shape[-1], device=probs.device, dtype=torch.float32)
    counts.index_add_(0, topk_index.reshape(-1), torch.ones(topk_index.numel(), device=probs.device))
    # a fill on the device, not torch.tensor(..., device=...): that copy from the host waits for the GPU
    num_tokens = torch.full((), float(probs.shape[0]), device=probs.device)
    return RoutingStats(probs.sum(dim=0), counts, num_tokens)


def load_balance_loss(stats: RoutingStats, top_k: int, form: str = "public") -> torch.Tensor:
    r"""Switch-style balance loss of one layer, at its minimum when routing is uniform.

    public (default; the public code and the 1e-3 coefficient of the paper's runs):
        L = E * sum_j (count_j / T) * P_j,  P_j = mean over tokens of p_j;  equals k at balance.
    paper:
        L = sum_j f_j P_j,  f_j = E / (k T) * count_j;  equals 1 at balance (public = k * paper).
    """
    num_experts = stats.prob_sum.shape[-1]
    tokens = stats.num_tokens.clamp_min(1.0)  # an empty batch gives 0, not NaN
    mean_prob = stats.prob_sum / tokens  # P_j
    load = stats.counts.detach() / tokens  # count_j / T; no gradient, as in Switch / Mixtral
    loss = num_experts * (load * mean_prob).sum()
    if AuxLossForm(form) is AuxLossForm.PAPER:
        loss = loss / top_k
    return loss
