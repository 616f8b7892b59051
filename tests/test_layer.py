"""GoatLayer around Linear, GPT-2 Conv1D and 1x1 Conv2d.

The batched forward is checked against the per-expert loop reference on outputs and on gradients of
lora_A, lora_B and the router, and shown to contain no Python loop over experts.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from goat_lora import functional as F
from goat_lora.config import GoatConfig
from goat_lora.inject import initial_factors
from goat_lora.layer import GoatLayer, base_weight_2d, layer_shape


def make_base(kind: str, m: int = 12, n: int = 16, dtype=torch.float32) -> nn.Module:
    if kind == "linear":
        module = nn.Linear(n, m)
    elif kind == "conv1d":
        module = Conv1D(m, n)  # GPT-2 style: weight (n, m), y = x W + b
        nn.init.normal_(module.weight, std=0.2)
        nn.init.normal_(module.bias, std=0.1)
    elif kind == "conv2d":
        module = nn.Conv2d(n, m, kernel_size=1)
    else:
        raise AssertionError(kind)
    return module.to(dtype)


def make_input(kind: str, n: int = 16, shape=(3, 5), dtype=torch.float32) -> torch.Tensor:
    if kind == "conv2d":
        return torch.randn(shape[0], n, 2, shape[1], dtype=dtype)  # (B, C, H, W)
    return torch.randn(*shape, n, dtype=dtype)


def make_layer(kind, config=None, m=12, n=16, dtype=torch.float32, router_scale=1.0):
    config = config or GoatConfig(r=4, num_experts=4, top_k=2, dropout=0.0)
    base = make_base(kind, m, n, dtype)
    generator = torch.Generator().manual_seed(0)
    layer = GoatLayer(
        base,
        initial_factors("layer", base, config, generator),
        top_k=config.top_k,
        residual_coef=config.residual_coefs,
        routing=config.routing,
        top_p=config.top_p,
        dropout=config.dropout,
        generator=generator,
    )
    with torch.no_grad():
        layer.router.weight.mul_(router_scale)
        layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))  # move off the init so B matters
    return layer


KINDS = ["linear", "conv1d", "conv2d"]


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_reference_layer_equivalence(kind):
    """The adapted layer equals an explicit (W0 - W_res) x + b + sum_j w_j s B_j A_j x written here."""
    base = make_base(kind)
    original = base_weight_2d(base).detach().clone()
    config = GoatConfig(r=4, num_experts=4, top_k=2, dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    layer = GoatLayer(
        base, initial_factors("l", base, config, generator), top_k=2, residual_coef=0.25, generator=generator
    )
    x = make_input(kind)
    y = layer(x)
    tokens = x.movedim(1, -1).reshape(-1, 16) if kind == "conv2d" else x.reshape(-1, 16)
    bias = base.bias
    W_res = 0.25 * layer.expert_scale[0] * layer.init_B @ layer.init_A
    w = F.route(tokens @ layer.router.weight.T, 2).weights
    expected = tokens @ (original - W_res).T + bias
    for j in range(4):
        expected = (
            expected
            + w[:, j : j + 1]
            * layer.expert_scale[j]
            * (tokens @ layer.lora_A[j : j + 1].T)
            @ layer.lora_B[:, j : j + 1].T
        )
    if kind == "conv2d":
        expected = expected.reshape(3, 2, 5, 12).movedim(-1, 1)
    else:
        expected = expected.reshape(3, 5, 12)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_base_weight_is_w0_minus_residual(kind):
    """After wrapping, W_base = W0 - init_cof * s * sum_j B_j A_j (the frozen initial factors)."""
    base = make_base(kind, m=20, n=24)
    original = base_weight_2d(base).detach().clone()
    config = GoatConfig(r=8, num_experts=4, top_k=2, init_cof=0.5)
    layer = GoatLayer(
        base, initial_factors("l", base, config, torch.Generator().manual_seed(0)), top_k=2, residual_coef=0.5
    )
    s = F.scaling_factor("goat", 24, 2)
    assert torch.allclose(layer.expert_scale, torch.full((4,), s))
    expected = 0.5 * s * sum(layer.init_B[:, 2 * j : 2 * j + 2] @ layer.init_A[2 * j : 2 * j + 2] for j in range(4))
    torch.testing.assert_close(original - base_weight_2d(layer.base_layer), expected, atol=1e-6, rtol=1e-5)
    # and the residual is made of the goat segments: U_j S_j V_j^T / rho summed, times c
    U, S, Vh = torch.linalg.svd(original.double(), full_matrices=False)
    idx = F.expert_component_indices("goat", 20, 4, 2).reshape(-1)
    svd_res = 0.5 * (U[:, idx] * S[idx]) @ Vh[idx] / 10.0
    torch.testing.assert_close(expected.double(), svd_res, atol=1e-5, rtol=1e-4)


ROUTING_CASES = [  # (routing, num_experts, top_k, top_p)
    ("top_k", 1, 1, 0.25),
    ("top_k", 4, 2, 0.25),
    ("top_k", 4, 4, 0.25),
    ("top_k", 8, 3, 0.25),
    ("top_p", 1, 1, 0.25),
    ("top_p", 4, 1, 0.25),
    ("top_p", 8, 1, 0.6),
    ("top_p", 8, 1, 1.0),
    ("shared", 2, 1, 0.25),
    ("shared", 4, 2, 0.25),
    ("shared", 8, 3, 0.25),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("routing, num_experts, top_k, top_p", ROUTING_CASES)
def test_batched_matches_loop_reference_outputs_and_gradients(kind, routing, num_experts, top_k, top_p):
    config = GoatConfig(
        r=num_experts * 2 if num_experts < 8 else 8,
        num_experts=num_experts,
        top_k=top_k,
        dropout=0.0,
        routing=routing,
        top_p=top_p,
    )
    layer = make_layer(kind, config, m=16, n=16, router_scale=5.0)
    x = make_input(kind)
    grads = []
    for fn in (layer.forward, layer.forward_loop_reference):
        layer.zero_grad()
        y = fn(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append(
            (y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), layer.router.weight.grad.clone())
        )
    for name, batched, loop in zip(("output", "lora_A", "lora_B", "router"), *grads):
        torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-5, msg=f"{name} differs")
    # a token that mixes several routed experts gives the router a gradient through w; a token that keeps one
    # (top_p = 0.25 with a sharp router) has w = 1 whatever p, so zero exactly (the balance loss trains the router)
    stats = layer.last_stats
    if float(stats.counts.sum()) > float(stats.num_tokens):
        assert float(grads[0][3].abs().sum()) > 0, "the router gets no gradient"


@pytest.mark.parametrize("kind", KINDS)
def test_under_bf16_autocast_the_layer_matches_float32_within_bf16_rounding(kind):
    """Under bfloat16 autocast the base runs in bf16 and the adapter (router, A, B) in the adapters' float32,
    added into the base's bf16 output: the layer's output and gradients are the float32 layer's within bf16
    rounding, in the input's dtype."""
    layer = make_layer(kind, GoatConfig(r=8, num_experts=4, top_k=2, dropout=0.0), m=32, n=32, router_scale=3.0)
    x = make_input(kind, n=32, shape=(6, 7)).bfloat16()
    grad_out = None
    results = []
    for autocast in (False, True):
        layer.zero_grad()
        inputs = (x if autocast else x.float()).detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(inputs)
        grad_out = torch.randn(out.shape) if grad_out is None else grad_out
        (out.float() * grad_out).sum().backward()
        results.append(
            (out, inputs.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), layer.router.weight.grad.clone())
        )
    assert results[1][0].dtype == results[1][1].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in results[1][2:])
    for name, exact, autocast in zip(("output", "x", "lora_A", "lora_B", "router"), *results):
        error = float((autocast.float() - exact.float()).norm() / exact.float().norm())
        assert error < 1e-2, f"{name}: relative error {error:.1e}, beyond bf16 rounding (2^-8 = 3.9e-3 per value)"


def test_forward_calls_the_batched_path_once_and_never_the_loop(monkeypatch):
    layer = make_layer("linear", GoatConfig(r=8, num_experts=8, top_k=2, dropout=0.0))
    calls = {"batched": 0}
    real = F.routed_experts

    def counting(*args, **kwargs):
        calls["batched"] += 1
        return real(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("the forward used the per-expert loop")

    monkeypatch.setattr(F, "routed_experts", counting)
    monkeypatch.setattr(F, "experts_delta_loop", forbidden)
    layer(torch.randn(2, 5, 16))
    assert calls["batched"] == 1


def test_forward_op_count_does_not_grow_with_experts():
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for num_experts in (2, 16):
        layer = make_layer("linear", GoatConfig(r=16, num_experts=num_experts, top_k=2, dropout=0.0), m=32, n=32)
        x = torch.randn(4, 32)
        with Count() as mode:
            layer(x)
        counts[num_experts] = mode.n
        with Count() as mode:
            layer.forward_loop_reference(x)
        counts[f"loop{num_experts}"] = mode.n
    assert counts[2] == counts[16]
    assert counts["loop16"] > counts["loop2"], "the counter cannot see a loop"


def test_router_sees_the_undropped_input_and_dropout_only_hits_the_experts():
    layer = make_layer("linear", GoatConfig(r=4, num_experts=4, top_k=2, dropout=0.5))
    layer.train()
    x = torch.randn(6, 16)
    layer(x)  # the routing probabilities are those of the undropped tokens
    torch.testing.assert_close(layer.last_stats.prob_sum, torch.softmax(x @ layer.router.weight.T, -1).sum(0))
    # with B = 0 the experts vanish; dropout must then change nothing (it is not on the base path)
    with torch.no_grad():
        layer.lora_B.zero_()
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    layer.eval()


def test_experts_dropout_is_inverted_dropout_with_a_saved_bool_mask(monkeypatch):
    """The layer's output and gradients equal those of the same experts fed x * keep / (1 - p) for the
    mask it drew (the 1/(1-p) is folded into the expert scales: equal up to float rounding), and
    autograd keeps that 1-byte mask, not float noise, for the backward."""
    from goat_lora import layer as layer_module

    masks = []
    real_keep_mask = layer_module.keep_mask
    monkeypatch.setattr(layer_module, "keep_mask", lambda *a: masks.append(real_keep_mask(*a)) or masks[-1])
    layer = make_layer("linear", GoatConfig(r=4, num_experts=4, top_k=2, dropout=0.3))
    layer.train()
    x = torch.randn(64, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    (keep,) = masks
    assert keep.dtype == torch.bool and keep.shape == x.shape and not keep.all()
    routing = F.route(layer.router(x_ref), layer.top_k)
    dropped = x_ref * keep / (1 - 0.3)
    expected = layer.base_layer(x_ref) + F.experts_delta(
        dropped, layer.lora_A, layer.lora_B, routing.weights, layer.expert_scale
    )
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, layer.lora_A, layer.lora_B, layer.router.weight], g)
    grads_ref = torch.autograd.grad(expected, [x_ref, layer.lora_A, layer.lora_B, layer.router.weight], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    big_float = {t.data_ptr() for t in saved if t.numel() == x.numel() and t.dtype.is_floating_point}
    assert big_float == {x.data_ptr()}  # the undropped tokens only (router, lora_A); x * keep is recomputed
    assert any(t is keep for t in saved)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_keep_mask_keeps_each_element_with_probability_one_minus_p(p):
    """Frequencies over 3 million draws within 5 standard deviations of 1 - p, overall, in each of the
    four lanes a 64-bit draw is split into, and for pairs of neighbours (independence)."""
    from goat_lora.layer import keep_mask

    torch.manual_seed(0)
    keep = keep_mask(torch.Size((1000, 3001)), p, torch.device("cpu")).reshape(-1).double()
    n = keep.numel()
    q = 1.0 - p
    tolerance = 5 * math.sqrt(q * (1 - q) / (n / 4))
    assert abs(float(keep.mean()) - q) < tolerance / 2
    for lane in range(4):
        assert abs(float(keep[lane::4].mean()) - q) < tolerance
    pairs = keep[:-1] * keep[1:]
    assert abs(float(pairs.mean()) - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / n)
    torch.manual_seed(0)
    again = keep_mask(torch.Size((1000, 3001)), p, torch.device("cpu")).reshape(-1).double()
    assert torch.equal(keep, again)  # seeded by torch.manual_seed


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_base(kind, monkeypatch):
    """A bf16 base: adapters and router float32, output bf16, the SVD in float32 or better."""
    svd_dtypes = []
    real_svd = torch.linalg.svd

    def spy(A, *args, **kwargs):
        svd_dtypes.append(A.dtype)
        return real_svd(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    base32 = make_base(kind)
    base16 = make_base(kind).to(torch.bfloat16)
    base16.load_state_dict({k: v.to(torch.bfloat16) for k, v in base32.state_dict().items()})
    config = GoatConfig(r=4, num_experts=4, top_k=2, dropout=0.0, svd_method="exact")
    layer = GoatLayer(
        base16, initial_factors("l", base16, config, torch.Generator().manual_seed(0)), top_k=2, residual_coef=0.25
    )
    assert svd_dtypes and all(dt in (torch.float32, torch.float64) for dt in svd_dtypes)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    for tensor in (layer.lora_A, layer.lora_B, layer.router.weight, layer.init_A, layer.init_B, layer.expert_scale):
        assert tensor.dtype == torch.float32
    x = make_input(kind, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.router.weight.grad is not None
    # the result is close to the float32 layer's (bf16 rounding of W0 - W_res and of the output)
    ref = GoatLayer(
        base32, initial_factors("l", base32, config, torch.Generator().manual_seed(0)), top_k=2, residual_coef=0.25
    )
    with torch.no_grad():
        ref.router.weight.copy_(layer.router.weight)
    torch.testing.assert_close(y.float(), ref(x.float()), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("svd_method", ["exact", "gram"])
def test_svd_routes_run_in_float32_or_better_for_bf16(svd_method, monkeypatch):
    dtypes = []
    for fn_name in ("svd", "eigh"):
        real = getattr(torch.linalg, fn_name)

        def spy(A, *args, _real=real, **kwargs):
            dtypes.append(A.dtype)
            return _real(A, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, fn_name, spy)
    base = make_base("linear", m=20, n=24, dtype=torch.bfloat16)
    config = GoatConfig(r=8, num_experts=4, svd_method=svd_method)
    factors = initial_factors("l", base, config, torch.Generator().manual_seed(0))
    assert dtypes and all(dt in (torch.float32, torch.float64) for dt in dtypes)
    assert factors.A.dtype == factors.B.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype, unit", [(torch.float32, 2.0**-24), (torch.bfloat16, 2.0**-8)])
def test_restore_base_weight_within_rounding(kind, dtype, unit):
    """W0 -> W0 - W_res -> + W_res: two roundings, each at most u * |value| (u the unit roundoff)."""
    base = make_base(kind, m=20, n=24, dtype=dtype)
    original = base_weight_2d(base).detach().float().clone()
    config = GoatConfig(r=8, num_experts=4, top_k=2)
    layer = GoatLayer(
        base, initial_factors("l", base, config, torch.Generator().manual_seed(0)), top_k=2, residual_coef=0.25
    )
    residual = layer.residual()
    assert float(residual.abs().max()) > 1e-3  # the test means something only if W_res is not tiny
    restored = base_weight_2d(layer.restore_base_weight()).float()
    bound = unit * ((original - residual).abs() + original.abs()) * 1.01 + 1e-12
    assert torch.all((restored - original).abs() <= bound), float(((restored - original).abs() - bound).max())


def test_unsupported_layers_raise():
    factors = F.ExpertFactors(torch.zeros(2, 4), torch.zeros(4, 2), torch.ones(2))
    for module in (
        nn.Conv2d(4, 4, 3),
        nn.Conv2d(4, 4, 1, padding=1),
        nn.Conv2d(4, 4, 1, stride=2),
        nn.Embedding(4, 4),
        nn.Conv1d(4, 4, 1),
    ):
        with pytest.raises(ValueError, match=r"cannot adapt .*supported: nn.Linear, transformers Conv1D"):
            GoatLayer(module, factors, top_k=1, residual_coef=0.5)


def test_factors_of_the_wrong_shape_raise():
    with pytest.raises(ValueError, match=r"do not fit a layer of shape \(out=12, in=16\)"):
        GoatLayer(
            nn.Linear(16, 12),
            F.ExpertFactors(torch.zeros(4, 15), torch.zeros(12, 4), torch.ones(2)),
            top_k=1,
            residual_coef=0.5,
        )


def test_layer_shape_of_each_kind():
    assert layer_shape(nn.Linear(16, 12)) == (12, 16)
    assert layer_shape(Conv1D(12, 16)) == (12, 16)
    assert layer_shape(nn.Conv2d(16, 12, 1)) == (12, 16)


def test_aux_loss_and_expert_load_follow_the_forward():
    layer = make_layer("linear", GoatConfig(r=4, num_experts=4, top_k=2, dropout=0.0))
    assert float(layer.aux_loss()) == 0.0  # before any forward
    x = torch.randn(10, 16)
    layer(x)
    routing = F.route(layer.router(x), 2)
    expected = F.load_balance_loss(F.routing_stats(routing))
    torch.testing.assert_close(layer.aux_loss(), expected)
    load = layer.expert_load()
    assert load.shape == (4,) and float(load.sum()) == pytest.approx(1.0)
    counts = torch.bincount(routing.weights.topk(2, -1).indices.reshape(-1), minlength=4).double()
    torch.testing.assert_close(load, counts / counts.sum())
    layer(x)  # counts accumulate; fractions unchanged
    torch.testing.assert_close(layer.expert_load(), counts / counts.sum())
    layer.reset_expert_load()
    assert float(layer.expert_load().sum()) == 0.0
    layer.aux_loss().backward()
    assert float(layer.router.weight.grad.abs().sum()) > 0


def test_token_mask_excludes_padding_from_the_stats():
    layer = make_layer("linear", GoatConfig(r=4, num_experts=4, top_k=1, dropout=0.0))
    x = torch.randn(2, 5, 16)
    layer.token_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    layer(x)
    assert float(layer.last_stats.num_tokens) == 8 and float(layer.last_stats.counts.sum()) == 8
    layer.token_mask = None
    layer(x)
    assert float(layer.last_stats.num_tokens) == 10


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(kind):
    layer = make_layer(kind)
    x = make_input(kind, shape=(0, 5))
    y = layer(x)
    assert y.shape[0] == 0 and y.shape == layer.base_layer(x).shape
    loss = float(layer.aux_loss().detach())
    assert loss == 0.0 and not math.isnan(loss)


# ---- routing variants: the residual follows E[w_j] --------------------------------------


def _variant_layer(routing, num_experts, top_k, top_p, kind="linear", m=12, n=16):
    config = GoatConfig(
        r=2 * num_experts, num_experts=num_experts, top_k=top_k, top_p=top_p, routing=routing, dropout=0.0
    )
    base = make_base(kind, m, n)
    original = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    layer = GoatLayer(
        base,
        initial_factors("l", base, config, generator),
        top_k=top_k,
        top_p=top_p,
        routing=routing,
        residual_coef=config.residual_coefs,
        generator=generator,
    )
    return original, layer


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "routing, top_k, top_p, exact",
    [
        ("top_k", 4, 0.25, True),
        ("top_k", 2, 0.25, False),
        ("top_p", 1, 1.0, True),
        ("top_p", 1, 0.8, True),
        ("top_p", 1, 0.25, False),
        ("shared", 3, 0.25, True),
        ("shared", 1, 0.25, False),
    ],
)
def test_zero_router_layer_equals_the_pretrained_layer_where_exact(kind, routing, top_k, top_p, exact):
    """E = 4 and a zero router: uniform probabilities. top_k with k = E, top_p with p > 3/4 (keeps all)
    and shared with k = E - 1 give every expert exactly E[w_j], so the layer is the pretrained one; top-2,
    top_p 0.25 (keeps expert 0 only) and shared top-1 do not: the comparison can fail."""
    original, layer = _variant_layer(routing, 4, top_k, top_p, kind)
    with torch.no_grad():
        layer.router.weight.zero_()
        x = make_input(kind)
        diff = float((layer(x) - original(x)).abs().max())
    assert (diff < 1e-5) == exact, diff
    if not exact:
        assert diff > 1e-3


@pytest.mark.parametrize(
    "routing, top_k, top_p",
    [("top_k", 2, 0.25), ("top_p", 1, 0.25), ("top_p", 1, 0.5), ("shared", 2, 0.25), ("shared", 1, 0.25)],
)
def test_layer_equals_the_pretrained_layer_in_expectation_over_routers(routing, top_k, top_p):
    """Monte Carlo over 4000 router draws (nn.Linear's Kaiming-uniform init, scaled up so the routing
    is far from uniform): the mean adapted output of each token is the pretrained output, to within
    Monte Carlo error, for every variant, because the residual uses each mode's E[w_j]. The same
    average with the top-k residual (1/E) in shared mode is far off."""
    original, layer = _variant_layer(routing, 8, top_k, top_p, m=16, n=16)
    x = torch.randn(6, 16)
    draws = 4000
    routers = torch.empty(draws, *layer.router.weight.shape)
    nn.init.kaiming_uniform_(routers, a=5**0.5, generator=torch.Generator().manual_seed(1))
    routers *= 20.0
    with torch.no_grad():
        logits = torch.einsum("tn,ren->rte", x, routers).reshape(draws * 6, -1)
        weights = F.route(logits, top_k, routing, top_p).weights.reshape(draws, 6, -1)  # (draws, T, E)
        per_expert = torch.stack(
            [  # (E, T, m): s_j B_j A_j x for each expert
                layer.expert_scale[j] * (x @ layer.lora_A[2 * j : 2 * j + 2].T) @ layer.lora_B[:, 2 * j : 2 * j + 2].T
                for j in range(8)
            ]
        )
        outputs = layer.base_layer(x) + torch.einsum("dte,etm->dtm", weights, per_expert)  # (draws, T, m)
        # the batched layer computes the same thing (for one draw)
        layer.router.weight.copy_(routers[0])
        torch.testing.assert_close(layer(x), outputs[0], atol=1e-5, rtol=1e-5)
    mean, stderr = outputs.mean(0), outputs.std(0) / math.sqrt(draws)
    error = (mean - original(x)).abs()
    assert torch.all(error <= 5 * stderr + 1e-5), float((error / (stderr + 1e-12)).max())
    assert float(stderr.max()) > 1e-4  # the routing really varies between draws
    if routing == "shared":
        top_k_residual = F.residual_weight(F.ExpertFactors(layer.init_A, layer.init_B, layer.expert_scale), 1 / 8)
        wrong = mean + x @ (layer.residual() - top_k_residual).T  # what the layer would give with c = 1/E
        assert float(((wrong - original(x)).abs() / (stderr + 1e-12)).max().detach()) > 20


def test_shared_expert_base_weight_and_router():
    """shared: W0 - W_res with c_0 = 1 for the shared expert and 1/(E-1) for the others; the router has
    E - 1 outputs; the shared expert's load is every token."""
    original, layer = _variant_layer("shared", 4, 2, 0.25, m=20, n=24)
    assert layer.router.weight.shape == (3, 24) and layer.residual_coefs == pytest.approx((1.0, 1 / 3, 1 / 3, 1 / 3))
    s = layer.expert_scale
    expected = s[0] * layer.init_B[:, :2] @ layer.init_A[:2] + sum(
        s[j] / 3 * layer.init_B[:, 2 * j : 2 * j + 2] @ layer.init_A[2 * j : 2 * j + 2] for j in (1, 2, 3)
    )
    torch.testing.assert_close(
        base_weight_2d(original) - base_weight_2d(layer.base_layer), expected, atol=1e-6, rtol=1e-5
    )
    x = torch.randn(10, 24)
    layer(x)
    torch.testing.assert_close(layer.expert_load()[0], torch.tensor(1 / 3, dtype=torch.float64))  # T of 3 T uses
    assert float(layer.load_counts[1:].sum()) == 20 and float(layer.load_counts[0]) == 10
    assert layer.last_stats.counts.shape == (3,) and float(layer.last_stats.num_tokens) == 10


def test_top_p_expert_load_counts_the_experts_actually_used():
    _, layer = _variant_layer("top_p", 8, 1, 0.5, m=16)
    with torch.no_grad():
        layer.router.weight.mul_(10.0)
    x = torch.randn(50, 16)
    layer(x)
    used = F.route(layer.router(x), 1, "top_p", 0.5).used
    torch.testing.assert_close(layer.load_counts, used.sum(0).double())
    assert int(used.sum(-1).min()) < int(used.sum(-1).max())  # a variable number per token


@pytest.mark.parametrize("num_experts, top_k", [(1, 1), (4, 4)])
def test_shared_mode_needs_a_routed_expert_for_each_slot(num_experts, top_k):
    factors = F.ExpertFactors(torch.zeros(num_experts, 4), torch.zeros(4, num_experts), torch.ones(num_experts))
    with pytest.raises(ValueError, match=r"routing='shared' .* top_k=.* must be between 1 and"):
        GoatLayer(nn.Linear(4, 4), factors, top_k=top_k, residual_coef=0.5, routing="shared")


def test_residual_coef_of_the_wrong_length_is_refused():
    factors = F.ExpertFactors(torch.zeros(4, 4), torch.zeros(4, 4), torch.ones(4))
    with pytest.raises(ValueError, match=r"residual_coef has 3 values; give one, or one per expert \(4\)"):
        GoatLayer(nn.Linear(4, 4), factors, top_k=1, residual_coef=[0.25] * 3)
