"""Every formula of docs/spec.md, checked on small tensors.

Expected numbers are computed by hand from the spec (scaling table) or by an independent float64
route (full SVD, explicit sums) inside the test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from goat_lora import functional as F
from goat_lora.svd import singular_components

# ---- 1. scaling -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, n, d, eta, alpha, expected",
    [
        ("goat", 768, 1, 1.0, 16, 48.0),
        ("goat", 1024, 4, 1.0, 16, 27.7128),
        ("goat", 4096, 1, 1.0, 16, 110.8513),
        ("goat", 4096, 1, 0.1, 16, math.sqrt(3 * 0.1 * 4096)),
        ("goat", 4096, 4, 0.1, 16, math.sqrt(3 * 0.1 * 4096 / 4)),
        ("alpha", 768, 1, 1.0, 16, 16.0),  # the public scripts: lora_alpha = 2r, d = r/E -> s = 2E
        ("alpha", 768, 4, 1.0, 64, 16.0),
        ("alpha", 768, 2, 1.0, 16, 8.0),
        ("rslora", 768, 4, 1.0, 16, 8.0),
        ("rslora", 768, 2, 1.0, 16, 16 / math.sqrt(2)),
    ],
)
def test_scaling_factor(mode, n, d, eta, alpha, expected):
    assert F.scaling_factor(mode, n, d, eta=eta, lora_alpha=alpha) == pytest.approx(expected, abs=1e-4)


def test_scaling_factor_rejects_unknown_mode():
    with pytest.raises(ValueError):
        F.scaling_factor("sqrt", 768, 1)


def test_per_expert_scales_goat_s():
    S = torch.tensor([[8.0, 4.0], [3.0, 1.0], [0.5, 0.5]])  # (E=3, d=2); sigma = 12, 4, 1
    scales = F.per_expert_scales(10.0, S)
    torch.testing.assert_close(scales, torch.tensor([10.0, 10.0 * math.sqrt(3.0), 10.0 * math.sqrt(12.0)]))
    assert scales.dtype == torch.float32


# ---- 2. component indices ---------------------------------------------------------------------------

H, E, D = 16, 4, 2  # t = 4


@pytest.mark.parametrize(
    "init, expected",
    [
        ("goat", [[0, 1], [4, 5], [8, 9], [12, 13]]),
        ("goat_mini", [[2, 3], [6, 7], [10, 11], [14, 15]]),
        ("principal", [[0, 1], [2, 3], [4, 5], [6, 7]]),
        ("minor", [[8, 9], [10, 11], [12, 13], [14, 15]]),
    ],
)
def test_component_indices(init, expected):
    assert F.expert_component_indices(init, H, E, D).tolist() == expected


def test_component_indices_uneven_spectrum():
    # h = 10, E = 3 -> t = 3; the last component (index 9) is in no segment
    assert F.expert_component_indices("goat", 10, 3, 2).tolist() == [[0, 1], [3, 4], [6, 7]]
    assert F.expert_component_indices("goat_mini", 10, 3, 2).tolist() == [[1, 2], [4, 5], [7, 8]]
    assert F.expert_component_indices("minor", 10, 3, 2).tolist() == [[4, 5], [6, 7], [8, 9]]


def test_random_indices_are_disjoint_aligned_in_range_and_seeded():
    draws = []
    for seed in range(20):
        idx = F.expert_component_indices("random", 40, 5, 3, torch.Generator().manual_seed(seed))
        assert idx.shape == (5, 3)
        flat = idx.reshape(-1)
        assert len(set(flat.tolist())) == 15, "experts overlap"
        assert int(flat.min()) >= 0 and int(flat.max()) < 40
        assert torch.equal(idx - idx[:, :1], torch.arange(3).expand(5, 3)), "each expert is a consecutive block"
        assert torch.all(idx[:, 0] % 3 == 0) and torch.all(idx[1:, 0] > idx[:-1, 0])
        again = F.expert_component_indices("random", 40, 5, 3, torch.Generator().manual_seed(seed))
        assert torch.equal(idx, again), "same seed, same blocks"
        draws.append(tuple(flat.tolist()))
    assert len(set(draws)) > 10, "the generator is ignored"


def test_segment_shorter_than_expert_rank_is_refused():
    with pytest.raises(ValueError, match=r"d=3 is larger than the spectrum segment t=min\(m, n\)//E=16//8=2"):
        F.expert_component_indices("goat", 16, 8, 3)


def test_zero_init_has_no_components():
    with pytest.raises(ValueError, match="zero"):
        F.expert_component_indices("zero", 16, 4, 2)


# ---- 4. expert factors and residual ------------------------------------------------------------------


def _svd64(W):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U, S, Vh.T


@pytest.mark.parametrize("init", ["goat", "goat_mini", "principal", "minor", "random"])
@pytest.mark.parametrize("per_expert", [False, True], ids=["s", "goat-s"])
def test_each_expert_is_its_svd_slice_over_rho(init, per_expert):
    torch.manual_seed(3)
    m, n, num_experts, d, rho = 20, 24, 4, 2, 10.0
    W = torch.randn(m, n)
    idx = F.expert_component_indices(init, min(m, n), num_experts, d, torch.Generator().manual_seed(0))
    U, S, V = singular_components(W, idx.reshape(-1), "exact")
    s = F.scaling_factor("goat", n, d)
    scales = F.per_expert_scales(s, S.reshape(num_experts, d)) if per_expert else torch.full((num_experts,), s)
    factors = F.svd_expert_factors(U, S, V, scales, rho)
    assert factors.A.shape == (num_experts * d, n) and factors.B.shape == (m, num_experts * d)
    assert factors.A.dtype == factors.B.dtype == torch.float32
    U64, S64, V64 = _svd64(W)
    for j in range(num_experts):
        cols = idx[j]
        B_j, A_j = factors.B[:, j * d : (j + 1) * d].double(), factors.A[j * d : (j + 1) * d].double()
        expected = U64[:, cols] @ torch.diag(S64[cols]) @ V64[:, cols].T / rho  # sign-free product
        torch.testing.assert_close(float(scales[j]) * B_j @ A_j, expected, atol=1e-5, rtol=1e-4)
        # B_j and A_j carry the same sqrt(S_j) / sqrt(s_j rho) (balanced factors, as in PiSSA)
        torch.testing.assert_close(B_j.norm(dim=0), A_j.norm(dim=1), atol=1e-6, rtol=1e-5)
    # the residual: W_res = c * sum_j s_j B_j A_j
    c = 0.25
    expected_res = c * sum(
        U64[:, idx[j]] @ torch.diag(S64[idx[j]]) @ V64[:, idx[j]].T / rho for j in range(num_experts)
    )
    torch.testing.assert_close(F.residual_weight(factors, c).double(), expected_res, atol=1e-5, rtol=1e-4)


def test_goat_s_makes_experts_on_small_singular_values_larger():
    S = torch.tensor([[4.0], [1.0]])
    factors = F.svd_expert_factors(torch.eye(3, 2), S.reshape(-1), torch.eye(3, 2), F.per_expert_scales(2.0, S), 1.0)
    assert factors.expert_scale.tolist() == pytest.approx([2.0, 4.0])
    # s_j B_j A_j is still U_j S_j V_j^T / rho: the larger scale is absorbed by smaller factors
    assert float(factors.B[0, 0] * factors.A[0, 0] * 2.0) == pytest.approx(4.0)
    assert float(factors.B[1, 1] * factors.A[1, 1] * 4.0) == pytest.approx(1.0)


def test_zero_factors_are_plain_lora():
    g = torch.Generator().manual_seed(0)
    factors = F.zero_expert_factors(out_features=6, in_features=25, total_rank=4, num_experts=2, scale=3.0, generator=g)
    assert torch.all(factors.B == 0)
    assert float(factors.A.abs().max()) <= 1 / math.sqrt(25) + 1e-7  # Kaiming-uniform, a = sqrt(5)
    assert float(factors.A.abs().max()) > 0.5 / math.sqrt(25)
    assert factors.expert_scale.tolist() == [3.0, 3.0]
    assert torch.all(F.residual_weight(factors, 0.5) == 0)


def test_residual_weight_takes_one_coefficient_per_expert():
    """W_res = sum_j c_j s_j B_j A_j, written out expert by expert; a scalar c means c for every expert."""
    g = torch.Generator().manual_seed(0)
    factors = F.ExpertFactors(
        torch.randn(6, 5, generator=g), torch.randn(4, 6, generator=g), torch.tensor([2.0, 3.0, 5.0])
    )
    coefs = torch.tensor([1.0, 0.5, 0.25])
    expected = sum(
        coefs[j] * factors.expert_scale[j] * factors.B[:, 2 * j : 2 * j + 2] @ factors.A[2 * j : 2 * j + 2]
        for j in range(3)
    )
    torch.testing.assert_close(F.residual_weight(factors, coefs), expected)
    torch.testing.assert_close(F.residual_weight(factors, 0.5), F.residual_weight(factors, torch.full((3,), 0.5)))


# ---- 5. routing -------------------------------------------------------------------------------------


def _chosen(routing):
    """The routed experts' part of `used` (the shared expert, when there is one, is column 0)."""
    return routing.used[:, routing.used.shape[-1] - routing.probs.shape[-1] :]


@pytest.mark.parametrize("num_experts, top_k", [(1, 1), (4, 1), (8, 2), (8, 8), (5, 3)])
def test_route_keeps_top_k_and_renormalises(num_experts, top_k):
    logits = torch.randn(50, num_experts) * 3
    routing = F.route(logits, top_k)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(routing.probs, probs)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(50))
    assert torch.all(routing.used.sum(-1) == top_k) and torch.equal(routing.used, routing.weights > 0)
    # the kept ones are the k largest probabilities, in proportion to them
    kth = probs.topk(top_k, -1).values[:, -1:]
    chosen = routing.used
    assert torch.all(probs[chosen].reshape(50, top_k) >= kth - 1e-7)
    assert torch.all(routing.weights[~chosen] == 0)
    expected = torch.where(chosen, probs, 0.0)
    torch.testing.assert_close(routing.weights, expected / expected.sum(-1, keepdim=True))


def _top_p_reference(probs: list[float], p: float) -> set[int]:
    """The definition, token by token: walk the experts in descending probability (lower index first on
    ties) and stop as soon as the kept mass reaches p."""
    order = sorted(range(len(probs)), key=lambda j: (-probs[j], j))
    kept, mass = set(), 0.0
    for j in order:
        kept.add(j)
        mass += probs[j]
        if mass >= p:
            break
    return kept


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    num_experts=st.integers(1, 16),
    top_p=st.sampled_from([1e-3, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0]),
    temperature=st.sampled_from([0.1, 1.0, 5.0]),
    seed=st.integers(0, 2**16),
)
def test_top_p_keeps_the_smallest_most_probable_set_reaching_p(num_experts, top_p, temperature, seed):
    logits = torch.randn(20, num_experts, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    probs = torch.softmax(logits * temperature, -1)
    probs[:3] = 1.0 / num_experts  # ties: uniform rows
    routing = F.route(probs.log(), mode="top_p", top_p=top_p)
    for t in range(20):
        kept = set(routing.used[t].nonzero().flatten().tolist())
        row = routing.probs[t].double()
        prefix = row.sort(descending=True).values.cumsum(0)
        if t >= 3 and bool((prefix - top_p).abs().min() > 1e-5):  # away from ties and from rounding at p
            assert kept == _top_p_reference(row.tolist(), top_p), t
        if top_p == 1.0:  # every expert with a probability at all
            assert kept == set(row.nonzero().flatten().tolist())
        kept_mass = float(row[list(kept)].sum())
        assert 1 <= len(kept) <= num_experts
        assert kept_mass >= top_p - 1e-5 or len(kept) == num_experts  # reaches p ...
        assert kept_mass - float(row[list(kept)].min()) < top_p + 1e-5  # ... and no smaller set of the top ones does
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(20))
    expected = torch.where(routing.used, routing.probs, 0.0)
    torch.testing.assert_close(routing.weights, expected / expected.sum(-1, keepdim=True))


@pytest.mark.parametrize(
    "num_experts, top_p, kept",
    [(8, 0.25, 2), (8, 0.3, 3), (8, 1e-3, 1), (8, 0.875, 7), (8, 0.9, 8), (8, 1.0, 8), (5, 0.5, 3)],
)
def test_top_p_with_uniform_probabilities_keeps_the_first_ceil_p_e(num_experts, top_p, kept):
    """A zero router: every p_j = 1/E, ties broken by index, so experts 0..ceil(pE)-1, each 1/ceil(pE)."""
    routing = F.route(torch.zeros(4, num_experts), mode="top_p", top_p=top_p)
    expected = torch.zeros(num_experts)
    expected[:kept] = 1.0 / kept
    torch.testing.assert_close(routing.weights, expected.expand(4, -1))


def test_route_shared_expert_is_always_on_with_weight_one():
    """shared: the router's R = E - 1 logits choose top-k among experts 1..E-1; expert 0 has w_0 = 1."""
    logits = torch.randn(30, 7) * 3  # E = 8
    routing = F.route(logits, 2, mode="shared")
    assert routing.probs.shape == (30, 7) and routing.weights.shape == routing.used.shape == (30, 8)
    assert torch.all(routing.weights[:, 0] == 1) and torch.all(routing.used[:, 0])
    assert torch.all(routing.used.sum(-1) == 3)
    torch.testing.assert_close(routing.weights[:, 1:], F.route(logits, 2).weights)  # plain top-2 of the 7
    torch.testing.assert_close(routing.weights.sum(-1), torch.full((30,), 2.0))


def test_route_in_float32_from_bf16_logits():
    for mode in ("top_k", "top_p", "shared"):
        routing = F.route(torch.randn(4, 8, dtype=torch.bfloat16), 2, mode=mode)
        assert routing.probs.dtype == routing.weights.dtype == torch.float32


@pytest.mark.parametrize("mode", ["top_k", "top_p", "shared"])
def test_route_empty_batch(mode):
    routing = F.route(torch.zeros(0, 8), 2, mode=mode)
    width = 9 if mode == "shared" else 8
    assert routing.weights.shape == routing.used.shape == (0, width) and routing.probs.shape == (0, 8)


def test_route_rejects_unknown_mode():
    with pytest.raises(ValueError):
        F.route(torch.zeros(2, 4), 2, mode="top-p")


# ---- 5b. the expected weights that the residual must match ---------------


@pytest.mark.parametrize(
    "mode, num_experts, expected",
    [
        ("top_k", 8, [1 / 8] * 8),
        ("top_p", 8, [1 / 8] * 8),
        ("shared", 8, [1.0] + [1 / 7] * 7),
        ("shared", 2, [1.0, 1.0]),
    ],
)
def test_expected_expert_weights(mode, num_experts, expected):
    torch.testing.assert_close(F.expected_expert_weights(mode, num_experts), torch.tensor(expected))


@pytest.mark.parametrize(
    "mode, num_experts, top_k, top_p",
    [
        ("top_k", 8, 2, None),
        ("top_k", 5, 3, None),
        ("top_p", 8, None, 0.25),
        ("top_p", 8, None, 0.6),
        ("top_p", 3, None, 0.5),
        ("shared", 8, 2, None),
        ("shared", 4, 1, None),
    ],
)
def test_expected_weights_by_monte_carlo(mode, num_experts, top_k, top_p):
    """E[w_j] over exchangeable logits (i.i.d. across experts; three temperatures, as a router at init
    gives more or less peaked probabilities) matches expected_expert_weights within 5 standard errors.
    A residual built with 1/E in "shared" mode (1/8 against 1/7) would be 30 standard errors off."""
    num_routed = num_experts - (mode == "shared")
    g = torch.Generator().manual_seed(0)
    weights = torch.cat(
        [
            F.route(
                torch.randn(100_000, num_routed, generator=g) * scale, top_k or 1, mode=mode, top_p=top_p or 0.25
            ).weights
            for scale in (0.3, 1.0, 3.0)
        ]
    )
    mean, stderr = weights.double().mean(0), weights.double().std(0) / math.sqrt(weights.shape[0])
    expected = F.expected_expert_weights(mode, num_experts).double()
    assert torch.all((mean - expected).abs() <= 5 * stderr + 1e-12), (mean, expected)
    if mode == "top_p":  # the number of experts per token really varies, and still the mean is 1/E
        used = (weights > 0).sum(-1)
        assert int(used.min()) < int(used.max())


@pytest.mark.parametrize(
    "mode, num_experts, top_k, top_p, exact",
    [
        ("top_k", 8, 8, 0.25, True),
        ("top_k", 8, 2, 0.25, False),
        ("top_p", 8, 2, 1.0, True),
        ("top_p", 8, 2, 0.9, True),
        ("top_p", 8, 2, 0.25, False),
        ("shared", 8, 7, 0.25, True),
        ("shared", 8, 2, 0.25, False),
    ],
)
def test_zero_router_gives_the_expected_weights_exactly_where_it_can(mode, num_experts, top_k, top_p, exact):
    """With a zero router, w = E[w] for every token (so the adapted layer is the pretrained one exactly)
    for top_k with k = E, top_p with p > (E-1)/E and shared with k = E - 1, and not otherwise."""
    num_routed = num_experts - (mode == "shared")
    weights = F.route(torch.zeros(3, num_routed), top_k, mode=mode, top_p=top_p).weights
    expected = F.expected_expert_weights(mode, num_experts).expand(3, -1)
    assert torch.allclose(weights, expected) == exact


# ---- 6. experts: batched vs loop --------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_experts, top_k, d, mode",
    [
        (1, 1, 3, "top_k"),
        (4, 2, 1, "top_k"),
        (8, 2, 2, "top_k"),
        (6, 6, 1, "top_k"),
        (16, 3, 4, "top_k"),
        (1, 1, 2, "top_p"),
        (8, 2, 2, "top_p"),
        (16, 1, 1, "top_p"),
        (2, 1, 3, "shared"),
        (8, 2, 2, "shared"),
        (6, 5, 1, "shared"),
    ],
)
def test_experts_delta_matches_loop_and_explicit_sum(num_experts, top_k, d, mode):
    T, n, m = 13, 10, 7
    x = torch.randn(T, n, dtype=torch.float64)
    A = torch.randn(num_experts * d, n, dtype=torch.float64)
    B = torch.randn(m, num_experts * d, dtype=torch.float64)
    scale = torch.rand(num_experts, dtype=torch.float64) + 0.5
    routing = F.route(torch.randn(T, num_experts - (mode == "shared")), top_k, mode=mode, top_p=0.5)
    weights = routing.weights.double()
    batched = F.experts_delta(x, A, B, weights, scale)
    loop = F.experts_delta_loop(x, A, B, routing._replace(weights=weights), scale)
    explicit = torch.zeros(T, m, dtype=torch.float64)
    for t in range(T):
        for j in routing.used[t].nonzero().flatten().tolist():
            sl = slice(j * d, (j + 1) * d)
            explicit[t] += weights[t, j] * scale[j] * (B[:, sl] @ (A[sl] @ x[t]))
    torch.testing.assert_close(batched, explicit)
    torch.testing.assert_close(loop, explicit)


@pytest.mark.parametrize("mode", ["top_k", "top_p", "shared"])
def test_experts_delta_is_two_matmuls_whatever_the_number_of_experts(mode):
    """The batched path's op count does not grow with E (no loop over experts), for every routing mode."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    counts = {}
    for num_experts in (2, 16):
        x, A, B = torch.randn(5, 32), torch.randn(num_experts * 2, 32), torch.randn(8, num_experts * 2)
        with Count() as mode_counter:
            weights = F.route(torch.randn(5, num_experts - (mode == "shared")), 1, mode=mode).weights
            F.experts_delta(x, A, B, weights, torch.ones(num_experts))
        counts[num_experts] = mode_counter.names
    assert counts[2] == counts[16]
    assert sum(name in ("matmul", "__matmul__", "mm", "linear") for name in counts[16]) == 2


def _plain_routed_experts(x, G, A, B, scale, keep, top_k, mode, top_p):
    """route + experts_delta written out in x's dtype, for autograd to differentiate (the reference)."""
    probs = torch.softmax(x @ G.T, dim=-1)
    used = F.top_p_mask(probs, top_p) if mode == "top_p" else F.top_k_mask(probs, top_k)
    kept = probs * used
    weights = kept / kept.sum(-1, keepdim=True)
    if mode == "shared":
        weights = torch.cat([torch.ones_like(weights[:, :1]), weights], dim=-1)
    dropped = x if keep is None else x * keep
    tokens, num_experts = weights.shape
    hidden = (dropped @ A.T).view(tokens, num_experts, -1) * (weights * scale).unsqueeze(-1)
    return hidden.view(tokens, -1) @ B.T, probs


ROUTED_CASES = [  # (num_experts, top_k, d, mode, top_p, dropout)
    (4, 2, 2, "top_k", 0.25, False),
    (8, 3, 1, "top_k", 0.25, True),
    (1, 1, 3, "top_k", 0.25, False),
    (6, 1, 2, "top_p", 0.5, True),
    (4, 1, 1, "top_p", 1.0, False),
    (4, 2, 2, "shared", 0.25, True),
    (2, 1, 2, "shared", 0.25, False),
]


def _routed_inputs(num_experts, d, mode, dropout, dtype=torch.float64, n=6, m=5, T=9):
    g = torch.Generator().manual_seed(num_experts * 10 + d)
    x = torch.randn(T, n, dtype=dtype, generator=g)
    G = torch.randn(num_experts - (mode == "shared"), n, dtype=dtype, generator=g)
    A = torch.randn(num_experts * d, n, dtype=dtype, generator=g)
    B = torch.randn(m, num_experts * d, dtype=dtype, generator=g)
    scale = torch.rand(num_experts, dtype=dtype, generator=g) + 0.5
    keep = torch.rand(T, n, generator=g) > 0.3 if dropout else None
    return [t.requires_grad_() for t in (x, G, A, B)], scale, keep


@pytest.mark.parametrize("num_experts, top_k, d, mode, top_p, dropout", ROUTED_CASES)
def test_routed_experts_backward_passes_gradcheck(num_experts, top_k, d, mode, top_p, dropout):
    """The hand-written backward of routed_experts against finite differences in float64, through the delta
    and through the probabilities (the balance loss's path) together."""
    (x, G, A, B), scale, keep = _routed_inputs(num_experts, d, mode, dropout)

    def outputs(x, G, A, B):
        delta, routing = F.routed_experts(x, G, A, B, scale, keep, top_k, mode, top_p)
        return delta, routing.probs

    assert torch.autograd.gradcheck(outputs, (x, G, A, B))


@pytest.mark.parametrize("num_experts, top_k, d, mode, top_p, dropout", ROUTED_CASES)
@pytest.mark.parametrize("reach", ["both", "delta", "probs"])
def test_routed_experts_equals_autograd_of_the_plain_formula(num_experts, top_k, d, mode, top_p, dropout, reach):
    """Outputs, routing and gradients of routed_experts equal autograd's of route + experts_delta written out,
    whichever outputs the loss uses (the experts' delta, the probabilities of the balance loss, or both)."""
    inputs, scale, keep = _routed_inputs(num_experts, d, mode, dropout)
    delta, routing = F.routed_experts(*inputs, scale, keep, top_k, mode, top_p)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref_delta, ref_probs = _plain_routed_experts(*ref_inputs, scale, keep, top_k, mode, top_p)
    torch.testing.assert_close(delta, ref_delta)
    torch.testing.assert_close(routing.probs, ref_probs)
    assert routing.used.shape == routing.weights.shape == (9, num_experts)
    torch.testing.assert_close(routing.weights.sum(-1), torch.full((9,), 1.0 + (mode == "shared"), dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    grad_delta, grad_prob_sum = (
        torch.randn(delta.shape, generator=g, dtype=torch.float64),
        torch.randn(ref_probs.shape[-1], generator=g, dtype=torch.float64),
    )

    def loss(delta, probs):
        parts = {"delta": (delta * grad_delta).sum(), "probs": (probs.sum(0) * grad_prob_sum).sum()}
        return parts["delta"] + parts["probs"] if reach == "both" else parts[reach]

    grads = torch.autograd.grad(loss(delta, routing.probs), inputs, allow_unused=True)
    ref_grads = torch.autograd.grad(loss(ref_delta, ref_probs), ref_inputs, allow_unused=True)
    for name, a, b in zip(("x", "router", "A", "B"), grads, ref_grads):
        if b is None:
            assert a is None or not a.any(), name
        else:
            torch.testing.assert_close(a, b, msg=f"{name} differs")


@pytest.mark.parametrize("frozen", [("x",), ("G",), ("A", "B"), ("x", "G")])
def test_routed_experts_computes_only_the_gradients_asked_for(frozen):
    inputs, scale, _ = _routed_inputs(4, 2, "top_k", False)
    for name, t in zip(["x", "G", "A", "B"], inputs):
        t.requires_grad_(name not in frozen)
    delta, routing = F.routed_experts(*inputs, scale, None, 2)
    wanted = [t for name, t in zip(["x", "G", "A", "B"], inputs) if name not in frozen]
    grads = torch.autograd.grad((delta.sum() + routing.probs.sum(0)[0]), wanted)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref_delta, ref_probs = _plain_routed_experts(*ref_inputs, scale, None, 2, "top_k", 0.25)
    ref_wanted = [t for name, t in zip(["x", "G", "A", "B"], ref_inputs) if name not in frozen]
    for a, b in zip(grads, torch.autograd.grad(ref_delta.sum() + ref_probs.sum(0)[0], ref_wanted)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "num_experts, top_k, d, mode", [(c[0], c[1], c[2], c[3]) for c in ROUTED_CASES if c[3] != "top_p"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_routed_experts_inference_equals_the_training_path(num_experts, top_k, d, mode, dtype):
    """Without gradient or routing statistics (eval, generation) the delta comes from a softmax over the top-k
    logits alone: the same experts and the same delta as routed_experts' softmax, top-k mask and renormalisation,
    with or without a shared expert and per-expert scales."""
    (x, G, A, B), scale, _ = _routed_inputs(num_experts, d, mode, False, dtype=dtype)
    x, G, A, B, scale = (t.detach() for t in (x, G, A, B, scale.to(dtype)))
    delta, _ = F.routed_experts(x, G, A, B, scale, None, top_k, mode)
    with torch.inference_mode():
        fast = F.routed_experts_inference(x, G, A, B, scale, top_k)
    torch.testing.assert_close(fast, delta)


def test_routed_experts_inference_breaks_ties_as_the_training_path():
    """A zero router gives every token equal logits and equal probabilities: both paths keep the same k experts
    (torch.topk's order among equal values), so the deltas agree to rounding."""
    (x, G, A, B), scale, _ = _routed_inputs(6, 2, "top_k", False)
    x, A, B = (t.detach() for t in (x, A, B))
    G = torch.zeros_like(G.detach())
    delta, routing = F.routed_experts(x, G, A, B, scale, None, 2, "top_k")
    assert routing.used.sum(-1).eq(2).all()
    torch.testing.assert_close(F.routed_experts_inference(x, G, A, B, scale, 2), delta)


# ---- 7. load-balancing loss -------------------------------------------------------------------------


def _stats(probs, used):
    """RoutingStats of routed probabilities (T, R) and the experts used (T, E) (E = R + shared)."""
    return F.routing_stats(F.Routing(probs, used, used.float()))


def _loss(probs, top_k, form):
    used = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, probs.topk(top_k, -1).indices, True)
    return F.load_balance_loss(_stats(probs, used), form)


def _round_robin(T, num_experts, top_k):
    index = (torch.arange(T)[:, None] * top_k + torch.arange(top_k)[None, :]) % num_experts
    return torch.zeros(T, num_experts, dtype=torch.bool).scatter(-1, index, True)


@pytest.mark.parametrize("num_experts, top_k", [(8, 2), (4, 1), (6, 6), (16, 4)])
def test_balance_loss_at_uniform_routing(num_experts, top_k):
    """Uniform probabilities and every expert chosen equally often: k (public form), 1 (paper form)."""
    T = num_experts * 3
    probs = torch.full((T, num_experts), 1.0 / num_experts)
    stats = _stats(probs, _round_robin(T, num_experts, top_k))  # counts exactly balanced
    assert float(F.load_balance_loss(stats, "public")) == pytest.approx(top_k)
    assert float(F.load_balance_loss(stats, "paper")) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "mode, num_experts, top_k, top_p, public",
    [
        ("top_k", 8, 2, None, 2.0),
        ("top_k", 8, 8, None, 8.0),
        ("top_p", 8, None, 0.25, 2.0),
        ("top_p", 8, None, 0.3, 3.0),
        ("top_p", 8, None, 1.0, 8.0),
        ("shared", 8, 2, None, 2.0),
        ("shared", 8, 7, None, 7.0),
        ("shared", 2, 1, None, 1.0),
    ],
)
def test_balance_loss_of_a_zero_router_for_each_variant(mode, num_experts, top_k, top_p, public):
    """Uniform routing as a zero router makes it, through route() and the layer's statistics: the public
    form equals the routed experts used per token (top_k, shared: k; top_p: ceil(p E)), the paper form 1.
    The shared expert is not in the loss: R = E - 1 probabilities and counts."""
    num_routed = num_experts - (mode == "shared")
    routing = F.route(torch.zeros(12, num_routed), top_k or 1, mode=mode, top_p=top_p or 0.25)
    stats = F.routing_stats(routing)
    assert stats.prob_sum.shape == stats.counts.shape == (num_routed,)
    assert float(F.load_balance_loss(stats, "public")) == pytest.approx(public)
    assert float(F.load_balance_loss(stats, "paper")) == pytest.approx(1.0)


def test_balance_loss_shared_mode_with_balanced_counts_by_hand():
    """E = 4 with a shared expert: R = 3 routed, top-1, counts (2, 1, 1) over T = 4 tokens,
    P = (0.5, 0.3, 0.2): public = 3 * (2/4 * 0.5 + 1/4 * 0.3 + 1/4 * 0.2) = 1.125; paper = public / 1."""
    probs = torch.tensor([[0.5, 0.3, 0.2]] * 4)
    used = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    stats = _stats(probs, used)
    assert stats.counts.tolist() == [2.0, 1.0, 1.0]
    assert float(F.load_balance_loss(stats, "public")) == pytest.approx(1.125)
    assert float(F.load_balance_loss(stats, "paper")) == pytest.approx(1.125)


def test_balance_loss_top_p_by_hand():
    """top_p: tokens use 1, 2 and 3 of R = 3 experts (m = 2): public = R sum_j (count_j / T) P_j and
    paper = R sum_j (count_j / sum counts) P_j = public / m."""
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.5, 0.4, 0.1]])
    used = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)  # counts (3, 2, 1)
    P = probs.mean(0)
    public = 3 * (3 / 3 * P[0] + 2 / 3 * P[1] + 1 / 3 * P[2])
    stats = _stats(probs, used)
    assert float(F.load_balance_loss(stats, "public")) == pytest.approx(float(public))
    assert float(F.load_balance_loss(stats, "paper")) == pytest.approx(float(public) / 2)


def test_balance_loss_formula_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4]])  # top-1: expert 0 twice
    # public: E * sum_j (count_j / T) P_j = 3 * (2/2 * 0.6) = 1.8
    assert float(_loss(probs, 1, "public")) == pytest.approx(1.8)
    # top-2: counts (2, 0, 1+... ) -> token 0 picks {0,1}, token 1 picks {0,2}: counts (2,1,1)/2
    # 3 * (1 * 0.6 + 0.5 * 0.15 + 0.5 * 0.25) = 2.4; paper = public / k = 1.2
    assert float(_loss(probs, 2, "public")) == pytest.approx(2.4)
    assert float(_loss(probs, 2, "paper")) == pytest.approx(1.2)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    num_experts=st.integers(1, 16),
    data=st.data(),
    temperature=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**16),
)
def test_balance_loss_is_at_least_its_uniform_value_per_token(num_experts, data, temperature, seed):
    """For each token, sum over its top-k of p_j >= k/E, so a batch of identical tokens has loss >= k
    (paper form >= 1): the loss is smallest when routing is uniform."""
    top_k = data.draw(st.integers(1, num_experts))
    T = data.draw(st.integers(1, 6))
    logits = torch.randn(1, num_experts, generator=torch.Generator().manual_seed(seed)) / temperature
    probs = torch.softmax(logits, -1).expand(T, num_experts)
    assert float(_loss(probs, top_k, "public")) >= top_k - 1e-5
    assert float(_loss(probs, top_k, "paper")) >= 1.0 - 1e-6


@settings(max_examples=50, deadline=None, derandomize=True)
@given(num_experts=st.integers(1, 16), data=st.data(), seed=st.integers(0, 2**16))
def test_balance_loss_with_balanced_counts_is_exactly_k(num_experts, data, seed):
    """With every expert chosen equally often, L = E * sum_j (k/E) P_j = k * sum_j P_j = k for any p."""
    top_k = data.draw(st.integers(1, num_experts))
    T = num_experts * data.draw(st.integers(1, 4))
    probs = torch.softmax(torch.randn(T, num_experts, generator=torch.Generator().manual_seed(seed)), -1)
    stats = _stats(probs, _round_robin(T, num_experts, top_k))
    assert float(F.load_balance_loss(stats, "public")) == pytest.approx(top_k, rel=1e-5)


def test_balance_loss_of_a_mixed_batch_can_dip_below_k():
    """The Switch-style loss is not bounded below by k for a mixed batch (counts and mean
    probabilities can be anti-correlated); this pins the formula rather than a false bound."""
    probs = torch.tensor([[0.51, 0.49], [0.51, 0.49], [0.0, 1.0]])  # counts (2, 1), P = (0.34, 0.66)
    assert float(_loss(probs, 1, "public")) == pytest.approx(2 * (2 / 3 * 0.34 + 1 / 3 * 0.66))
    assert float(_loss(probs, 1, "public")) < 1.0


@pytest.mark.parametrize("mode", ["top_k", "top_p", "shared"])
def test_balance_loss_gradient_reaches_router_probs_only(mode):
    logits = torch.randn(10, 4, requires_grad=True)
    routing = F.route(logits, 2, mode=mode)
    stats = F.routing_stats(routing)
    assert not stats.counts.requires_grad
    F.load_balance_loss(stats).backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_balance_loss_masks_padding_and_survives_empty_batch():
    probs = torch.softmax(torch.randn(6, 4), -1)
    routing = F.route(probs.log(), 1)
    mask = torch.tensor([True, True, False, True, False, False])
    masked = F.routing_stats(routing, mask)
    assert float(masked.num_tokens) == 3 and float(masked.counts.sum()) == 3
    torch.testing.assert_close(masked.prob_sum, probs[mask].sum(0))
    for mode in ("top_k", "top_p", "shared"):
        empty = F.routing_stats(F.route(torch.zeros(0, 4), 2, mode=mode))
        for form in ("public", "paper"):
            assert float(F.load_balance_loss(empty, form)) == 0.0
