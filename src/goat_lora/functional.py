r"""GOAT as pure tensor functions, in the order data flows (ICML 2025, arXiv 2502.16894).

One adapted layer ``y = W0 x + b`` with ``W0`` of shape (m, n) gets E LoRA experts of rank d = r / E
and a router (top-k; or top-p, or top-k plus an always-on shared expert: ``route``)::

        x ──► W0 - W_res ──────────────────────────────────────────────►(+)──► y
        │                                                                ▲
        ├──► G (router, n -> R) ─► softmax ─► keep ─► renormalise = w    │
        │                                                        │       │
        └──► dropout ─► A_cat (r x n) ─► h (T x r) ─► h * (w ⊗ 1_d) ─► B_cat (m x r) ─► * s

keep: top-k, or top-p; "shared" mode adds expert 0 with w_0 = 1 for every token (R = E - 1 routed).
Nothing here knows about nn.Module; layer.py wires these functions to parameters. Every
formula is the one in docs/spec.md; the tests in tests/test_functional.py check each.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import AuxLossForm, InitMode, RoutingMode, ScalingMode

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


def residual_weight(factors: ExpertFactors, coef: float | torch.Tensor) -> torch.Tensor:
    r"""W_res = sum_j c_j s_j B_j A_j  (m, n), float32; `coef` is one c for every expert or c_j (E,).

    Lemma 3.3: with c_j = E[w_j] (expected_expert_weights) the expected equivalent weight
    (W0 - W_res) + sum_j E[w_j] s_j B_j A_j equals W0.
    """
    num_experts = factors.expert_scale.shape[0]
    expert_rank = factors.A.shape[0] // num_experts
    col_scale = factors.expert_scale.repeat_interleave(expert_rank)  # (r,): s_j
    col_coef = torch.as_tensor(coef, dtype=torch.float32, device=factors.B.device).expand(num_experts)
    col_coef = col_coef.repeat_interleave(expert_rank)  # (r,): c_j
    return (col_coef[None, :] * (factors.B * col_scale[None, :])) @ factors.A


# ------------------------------------------------------------------------------------------------
# 5. Routing
# ------------------------------------------------------------------------------------------------


class Routing(NamedTuple):
    """One forward's routing. The R routed experts are the last R of the E; the first E - R (one in
    "shared" mode, else none) are shared: every token uses them with weight 1."""

    probs: torch.Tensor  # (T, R) softmax of the router logits, float32
    used: torch.Tensor  # (T, E) bool: the experts each token uses (shared ones for every token)
    weights: torch.Tensor  # (T, E) w_j: 1 for a shared expert, renormalised p_j for a kept routed one, else 0


def top_k_mask(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """(T, R) bool: each token's k most probable experts."""
    index = probs.topk(top_k, dim=-1).indices  # (T, k)
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, index, True)


def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    r"""(T, R) bool: for each token the fewest experts, taken in descending probability, whose
    probabilities sum to >= top_p (nucleus sampling's set). Expert i is kept while the mass ranked
    above it, 1 - (p_i + the mass ranked below), is still < top_p: the most probable expert is always
    kept, and top_p = 1 keeps every expert (computed from below, so rounding cannot drop a tiny last
    one). Ties are broken by expert index (a stable sort): with uniform probabilities the first
    ceil(top_p R) experts are kept."""
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (T, R)
    mass_from_here = sorted_probs.flip(-1).cumsum(dim=-1).flip(-1)  # p_i + everything ranked below i
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_from_here > 1.0 - top_p)


def route(router_logits: torch.Tensor, top_k: int = 2, mode: str = "top_k", top_p: float = 0.25) -> Routing:
    r"""p = softmax(x G^T) in float32 over the R routed experts; keep a set of them per token; w = p / sum(p_kept).

      top_k   keep the k most probable (top_k_mask)
      top_p   keep the fewest, most probable first, whose p sum to >= top_p (top_p_mask): 1 to R per token
      shared  top-k among the R = E - 1 routed experts, and expert 0 (outside the router) with w_0 = 1 for
              every token: DeepSeekMoE's ungated shared expert (Dai et al. 2024, arXiv 2401.06066,
              "shared expert isolation")
    The routed weights sum to 1 for every token in every mode.
    """
    mode = RoutingMode(mode)
    probs = torch.softmax(router_logits.float(), dim=-1)  # (T, R)
    keep = top_p_mask(probs, top_p) if mode is RoutingMode.TOP_P else top_k_mask(probs, top_k)  # (T, R)
    kept = probs * keep  # p where kept, else 0
    weights = kept / kept.sum(dim=-1, keepdim=True)  # (T, R): renormalised, zeros stay zeros
    if mode is RoutingMode.SHARED:
        weights = torch.cat([torch.ones_like(weights[:, :1]), weights], dim=-1)  # (T, E): w_0 = 1
        keep = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=-1)
    return Routing(probs, keep, weights)


def expected_expert_weights(mode: str, num_experts: int) -> torch.Tensor:
    r"""E[w_j] (E,) at initialisation, the residual coefficients c_j that keep the start at W0 in expectation.

    The router's logits x G^T are exchangeable across the R routed experts at init (the rows of G are
    i.i.d.), so the law of (w_1, ..., w_R) is invariant under permuting the experts and all routed
    E[w_j] are equal. In every mode the kept routed weights are renormalised, so for every token
    sum_{j routed} w_j = 1 exactly; taking expectations, R * E[w_j] = 1, so

      top_k   E[w_j] = 1/E           (R = E; the paper's Lemma 3.3, c = 1/E)
      top_p   E[w_j] = 1/E           (R = E; the same argument: how many experts a token keeps varies,
                                      the sum of their weights does not)
      shared  E[w_0] = 1, E[w_j] = 1/(E-1) for j >= 1   (w_0 = 1 always; R = E - 1 routed)

    Exact (not only in expectation) with a zero router, where p is uniform: top_k with k = E gives every
    expert 1/E, shared with k = E - 1 gives every routed expert 1/(E-1); top_p keeps only the first
    ceil(p E) experts (index tie-break), so it is exact only when p > (E - 1)/E keeps all of them.
    """
    mode = RoutingMode(mode)
    if mode is RoutingMode.SHARED:
        return torch.cat([torch.ones(1), torch.full((num_experts - 1,), 1.0 / (num_experts - 1))])
    return torch.full((num_experts,), 1.0 / num_experts)


# ------------------------------------------------------------------------------------------------
# 6. The experts' contribution: all experts in two matmuls
# ------------------------------------------------------------------------------------------------


class _MaskedProjection(torch.autograd.Function):
    """h = (x * keep) A^T for a bool keep mask. Saves x and the 1-byte mask, not the masked copy
    (a matmul would save that float copy for A's gradient): GOAT's router keeps x alive anyway, so
    dropout costs one byte per input element. Backward recomputes the masked input, a pointwise select.

    Backward selects with torch.where rather than multiplying by keep: under torch.compile, AOTAutograd
    traces forward and backward as one graph, its CSE merges a backward x * keep into the forward's,
    and the partitioner then saves that product, a float copy of the input per layer (1.2x compiled
    LoRA's peak memory on MiniLM). A select is a different node, so only x and keep cross over."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, keep, A)
        return (x * keep) @ A.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, keep, A = ctx.saved_tensors
        grad_x = grad_A = None
        # in grad's dtype, as autocast ran the forward matmul; results in the inputs' own dtypes
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(keep, grad @ A.to(grad.dtype), 0.0).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_A = (grad.T @ torch.where(keep, x, 0.0).to(grad.dtype)).to(A.dtype)
        return grad_x, None, grad_A


def experts_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    weights: torch.Tensor,
    expert_scale: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""sum_j w_j s_j B_j A_j x for every token, at the cost of one LoRA of rank r, whatever the routing mode.

    h = x A_cat^T (T, r), or (x * keep) A_cat^T for a dropout mask (the 1 / (1 - p) is the caller's,
    in expert_scale); each of expert j's d columns is multiplied by w_j s_j (zero when j is not
    used: the (T, E) weights are dense, so a variable number of experts per token costs nothing
    extra); y = h B_cat^T (T, m).
    """
    tokens, num_experts = weights.shape
    expert_rank = A.shape[0] // num_experts
    hidden = x @ A.T if keep is None else _MaskedProjection.apply(x, keep, A)  # (T, r)
    expert_weights = (weights * expert_scale).to(hidden.dtype)  # (T, E): w_j s_j, in the adapters' dtype
    # (T, E, d) * (T, E, 1): each of expert j's d columns times w_j s_j. A broadcast instead of
    # repeat_interleave, which on CUDA reads its output size back from the GPU (a sync per layer).
    scaled = (hidden.view(tokens, num_experts, expert_rank) * expert_weights.unsqueeze(-1)).view(
        tokens, A.shape[0]
    )  # (T, r)
    return scaled @ B.T  # (T, m)


class _RoutedExperts(torch.autograd.Function):
    r"""Router, routing and experts of one layer in one autograd node with the backward written out.

    Forward, for tokens x (T, n) in the adapters' dtype, autocast off (the adapter is small: r/n of the
    base's flops; in the adapters' float32 it needs no cast of A, B, the weights or the tokens):
        p = softmax(x G^T)            (T, R)   float32 (float64 for float64 inputs)
        u = keep(p)                   (T, R)   bool: top-k or top-p; no gradient
        w = p u / sum(p u)            (T, R)   renormalised weights
        c = [s_shared, w s_routed]    (T, E)   each expert's weight times its scale
        h = (x * keep_drop) A^T       (T, r)
        y = (h * (c ⊗ 1_d)) B^T       (T, m)
    Backward, given dy and dp (p's gradient from the balance loss, through routing_stats):
        dB = dy^T (h * c),  dh = (dy B) * c,  dc = sum_d (dy B) * h,  dA = dh^T (x * keep_drop)
        dlogits = c dc - w t + p * (dp - <p, dp>),   t = sum_j c_j dc_j   (routed columns)
        dG = dlogits^T x,  dx = (dh A) * keep_drop + dlogits G
    The dlogits line is the chain through renormalisation and softmax in closed form: with
    dL/dw_j = dc_j s_j, dL/dkept_j = (dc_j s_j - t) / sum(p u), and p_j u_j / sum(p u) = w_j, so
    softmax's correction sum_i p_i (...) vanishes for the routing part (sum_j w_j = 1). Autograd of
    the composite formula (route, experts_delta) takes more ops for the same numbers (docs/benchmarks.md
    counts a whole step); tests/test_functional.py checks this against it and with gradcheck."""

    @staticmethod
    def forward(ctx, x, G, A, B, expert_scale, keep, top_k, mode, top_p):
        ctx.set_materialize_grads(False)  # no zero gradients for the outputs without one (used, weights)
        tokens, num_experts, total_rank = x.shape[0], expert_scale.shape[0], A.shape[0]
        num_shared, rank = num_experts - G.shape[0], total_rank // num_experts  # d = rank
        route_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            probs = torch.softmax(x @ G.T, dim=-1, dtype=route_dtype)  # (T, R)
            used = top_p_mask(probs, top_p) if mode is RoutingMode.TOP_P else top_k_mask(probs, top_k)
            kept = probs * used  # p where kept, else 0
            weights = kept / kept.sum(dim=-1, keepdim=True)  # (T, R): w
            coef = weights * expert_scale[num_shared:]  # (T, R): w_j s_j
            if num_shared:  # shared experts: weight 1 for every token, outside the router
                coef = torch.cat([expert_scale[:num_shared].expand(tokens, num_shared), coef], dim=-1)
            hidden = (x if keep is None else x * keep) @ A.T  # (T, r)
            coef = coef.to(hidden.dtype)
            scaled = (hidden.view(tokens, num_experts, rank) * coef.unsqueeze(-1)).view(tokens, total_rank)
            delta = scaled @ B.T  # (T, m)
        ctx.save_for_backward(x, keep, G, A, B, probs, weights, coef, hidden, scaled)
        if num_shared:  # the (T, E) views that Routing reports
            ones = torch.ones_like(used[:, :num_shared])
            used, weights = torch.cat([ones, used], dim=-1), torch.cat([ones.to(weights.dtype), weights], dim=-1)
        ctx.mark_non_differentiable(used, weights)
        return delta, probs, used, weights

    @staticmethod
    def backward(ctx, grad_delta, grad_probs, _used, _weights):
        x, keep, G, A, B, probs, weights, coef, hidden, scaled = ctx.saved_tensors
        need_x, need_G, need_A, need_B = ctx.needs_input_grad[:4]
        tokens, total_rank = x.shape[0], A.shape[0]
        num_experts = coef.shape[-1]
        num_shared, rank = num_experts - G.shape[0], total_rank // num_experts
        grad_x = grad_G = grad_A = grad_B = grad_logits = None
        routed = slice(num_shared, None)  # the router's columns of (T, E)
        with torch.autocast(x.device.type, enabled=False):
            if grad_delta is not None:  # the experts' path (None when only the balance loss reached this layer)
                grad_delta = grad_delta.to(B.dtype)
                if need_B:
                    grad_B = grad_delta.T @ scaled  # (m, r)
                grad_scaled = (grad_delta @ B).view(tokens, num_experts, rank)  # (T, E, d)
                grad_hidden = (grad_scaled * coef.unsqueeze(-1)).view(tokens, total_rank)  # (T, r)
                if need_A:  # x * keep recomputed, not saved. Written keep * x: under torch.compile the forward and
                    # backward are one graph, and CSE would merge an identical x * keep into the forward's, which
                    # the partitioner would then save (a float copy of the input per layer)
                    grad_A = grad_hidden.T @ (x if keep is None else keep * x)  # (r, n)
                if need_x:
                    grad_x = grad_hidden @ A if keep is None else (grad_hidden @ A) * keep  # (T, n)
                if need_x or need_G:
                    # dc_j = sum_d (dy B)_jd h_jd: T E dot products of length d, one batched matmul
                    grad_coef = torch.bmm(grad_scaled.view(-1, 1, rank), hidden.view(-1, rank, 1))  # (T E, 1, 1)
                    grad_coef = grad_coef.view(tokens, num_experts)[:, routed].to(probs.dtype)  # (T, R)
                    coef = coef[:, routed].to(probs.dtype)
                    dot = torch.bmm(coef.unsqueeze(1), grad_coef.unsqueeze(-1)).view(tokens, 1)  # t = sum_j c_j dc_j
                    if grad_probs is None:  # c dc - w t
                        grad_logits = torch.addcmul(coef * grad_coef, weights, dot, value=-1.0)
                    else:  # the balance loss's path, a plain softmax backward, plus c dc - w t
                        softmax_grad = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
                        grad_logits = torch.addcmul(
                            torch.addcmul(softmax_grad, coef, grad_coef), weights, dot, value=-1.0
                        )
            elif grad_probs is not None and (need_x or need_G):
                grad_logits = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            if grad_logits is not None:
                grad_logits = grad_logits.to(G.dtype)  # (T, R)
                if need_G:
                    grad_G = grad_logits.T @ x  # (R, n)
                if need_x:
                    grad_x = grad_logits @ G if grad_x is None else torch.addmm(grad_x.to(G.dtype), grad_logits, G)
        return grad_x, grad_G, grad_A, grad_B, None, None, None, None, None


@torch.compiler.allow_in_graph
def _routed_experts_node(x, G, A, B, expert_scale, keep, top_k: int, nucleus: bool, top_p: float):
    """_RoutedExperts.apply as a single call in dynamo's graph. Under torch.compile dynamo does not trace the
    function's Python (its forward, its backward, and torch's checks of each output against each input:
    two thirds of what dynamo traced compiling a tiny LLaMA regionally, 30,578 bytecodes against LoRA's 7,155);
    AOTAutograd then traces the same aten ops through it, so inductor fuses what it fused before. What
    allow_in_graph asks of a function holds: tensors, ints, floats, bools and None in, tensors out, every
    tensor passed in, no side effects. `nucleus`: top-p routing (the forward's only use of the mode; a
    shared expert follows from the shapes of G and expert_scale)."""
    mode = RoutingMode.TOP_P if nucleus else RoutingMode.TOP_K
    return _RoutedExperts.apply(x, G, A, B, expert_scale, keep, top_k, mode, top_p)


def routed_experts(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    expert_scale: torch.Tensor,
    keep: torch.Tensor | None = None,
    top_k: int = 2,
    mode: str = "top_k",
    top_p: float = 0.25,
) -> tuple[torch.Tensor, Routing]:
    r"""route(x G^T) and experts_delta in one step with a hand-written backward (_RoutedExperts): the
    same numbers as the two composed, in about half the ops. x (T, n), G (R, n), A (r, n), B (m, r) in
    one dtype; the delta (T, m) comes back in it, with the Routing (its weights carry no gradient)."""
    nucleus = RoutingMode(mode) is RoutingMode.TOP_P
    delta, probs, used, weights = _routed_experts_node(
        x, router_weight, A, B, expert_scale, keep, top_k, nucleus, top_p
    )
    return delta, Routing(probs, used, weights)


def routed_experts_inference(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    expert_scale: torch.Tensor,
    top_k: int = 2,
) -> torch.Tensor:
    r"""routed_experts' delta (T, m) for top-k routing, shared expert or not, where nothing needs its gradient or
    its routing (eval, generation, serving): the same function in fewer ops (a kernel each on a GPU).

    A kept expert's renormalised weight is a softmax over the kept experts' logits alone,
        w_j = p_j / sum_{i kept} p_i = exp(l_j) / sum_{i kept} exp(l_i),
    and softmax is increasing, so the top k of the logits are the top k of p: one softmax over k columns
    replaces the softmax over R, the keep mask and the renormalisation. Two experts whose different logits
    give the same float32 p may be ordered the other way than routed_experts orders them.
    """
    num_routed = router_weight.shape[0]  # R
    num_shared = expert_scale.shape[0] - num_routed
    route_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        top_logits, index = (x @ router_weight.T).topk(top_k, dim=-1)  # (T, k)
        top_weights = torch.softmax(top_logits, dim=-1, dtype=route_dtype)  # (T, k): w of the kept experts
        weights = top_weights.new_zeros(x.shape[0], num_routed).scatter_(-1, index, top_weights)  # (T, R)
        if num_shared:  # shared experts: weight 1 for every token, outside the router (one op: a constant pad)
            weights = torch.nn.functional.pad(weights, (num_shared, 0), value=1.0)  # (T, E)
        return experts_delta(x, A, B, weights, expert_scale)


def experts_delta_loop(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: Routing, expert_scale: torch.Tensor
) -> torch.Tensor:
    """Reference: a Python loop over experts with index gathers (as the public code does)."""
    num_experts = routing.weights.shape[-1]
    expert_rank = A.shape[0] // num_experts
    out = x.new_zeros(x.shape[0], B.shape[0])
    for j in range(num_experts):
        (token_index,) = torch.where(routing.used[:, j])
        if token_index.numel() == 0:
            continue
        A_j = A[j * expert_rank : (j + 1) * expert_rank]  # (d, n)
        B_j = B[:, j * expert_rank : (j + 1) * expert_rank]  # (m, d)
        w_j = routing.weights[token_index, j][:, None]  # (T_j, 1)
        out = out.index_add(0, token_index, (expert_scale[j] * w_j).to(x.dtype) * ((x[token_index] @ A_j.T) @ B_j.T))
    return out


# ------------------------------------------------------------------------------------------------
# 7. Load-balancing loss
# ------------------------------------------------------------------------------------------------


class RoutingStats(NamedTuple):
    """What the load-balancing loss needs from one layer's forward, over the R routed experts; sums, so
    they add across micro-batches and processes. ``prob_sum`` carries the gradient to the router."""

    prob_sum: torch.Tensor  # (R,) sum over tokens of p_j
    counts: torch.Tensor  # (R,) number of tokens that used routed expert j (k per token for top-k, 1..R for top-p)
    num_tokens: torch.Tensor  # () T


def routing_stats(
    routing: Routing, token_mask: torch.Tensor | None = None, num_tokens: torch.Tensor | None = None
) -> RoutingStats:
    """Sufficient statistics of one forward; `token_mask` (T,) bool drops padding tokens. Shared experts
    (the first E - R columns of `used`) have no router probability and are left out. `num_tokens`: a ()
    float32 tensor holding T that the caller keeps (used without a mask, instead of a fill)."""
    probs, used = routing.probs, routing.used
    num_shared = used.shape[-1] - probs.shape[-1]
    used = used[:, num_shared:]  # (T, R)
    if token_mask is not None:
        # zeros for padding rather than probs[token_mask]: a boolean index has a data-dependent shape
        # (a graph break under torch.compile, a device-to-host sync on a GPU)
        probs = torch.where(token_mask[:, None], probs, 0.0)
        used = used & token_mask[:, None]
        num_tokens = token_mask.sum(dtype=torch.float32)
    elif num_tokens is None:  # a fill on the device, not torch.tensor(..., device=...): that waits for the GPU
        num_tokens = torch.full((), float(probs.shape[0]), device=probs.device)
    counts = used.sum(dim=0, dtype=torch.float32)  # (R,)
    return RoutingStats(probs.sum(dim=0), counts, num_tokens)


def load_balance_loss(stats: RoutingStats, form: str = "public") -> torch.Tensor:
    r"""Switch-style balance loss of one layer over its R routed experts, smallest when routing is uniform.

    public (default; the public code and the 1e-3 coefficient of the paper's runs):
        L = R * sum_j (count_j / T) * P_j,  P_j = mean over tokens of p_j.
    paper:
        L = sum_j f_j P_j,  f_j = R * count_j / sum_i count_i  (= R / (k T) * count_j for top-k).

    count_j counts the experts actually used. Every token of top_k and shared uses k routed experts; a
    top_p token uses 1 to R. Writing m = sum_j count_j / T (k, or the mean experts per token for top_p),
    public = m * paper. At uniform probabilities (P_j = 1/R) public = m whatever the counts (top_k,
    shared: k; top_p: m, ceil(p R) for a zero router) and paper = 1. A shared expert serves every token
    by construction and has no router probability: it is not in the loss (there is nothing to balance).

    Leading dimensions are layers: stats of L layers stacked ((L, R), (L, R), (L,)) give their L losses in
    the same few ops as one layer's (GoatModel.aux_loss), instead of a few ops per layer.
    """
    num_experts = stats.prob_sum.shape[-1]  # R
    tokens = stats.num_tokens.clamp_min(1.0)[..., None]  # an empty batch gives 0, not NaN
    mean_prob = stats.prob_sum / tokens  # P_j
    counts = stats.counts.detach()  # no gradient, as in Switch / Mixtral
    if AuxLossForm(form) is AuxLossForm.PAPER:
        return num_experts * (counts / counts.sum(-1, keepdim=True).clamp_min(1.0) * mean_prob).sum(-1)
    return num_experts * (counts / tokens * mean_prob).sum(-1)
