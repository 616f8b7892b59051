"""Seeded property sweep of one GoatLayer: in/out sizes 1..300, E 1..16, k 1..E,
d 1..4, 2-D / 3-D / empty token batches, float32 and bfloat16 bases, Linear / Conv1D / 1x1 Conv2d,
and every routing mode: top_k, top_p (p in (0, 1]) and shared (k 1..E-1).

The batched forward must equal the per-expert loop reference (outputs and the gradients of the router,
lora_A and lora_B), never produce NaN, its routed weights must sum to 1 (the shared expert's weight
is 1), and the experts each token uses must be the ones its mode allows. Factors are random (not from an SVD) so that
every size is reachable, including those too small for an SVD segment.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from goat_lora import functional as F
from goat_lora.layer import GoatLayer


@st.composite
def layer_cases(draw):
    routing = draw(st.sampled_from(["top_k", "top_p", "shared"]))
    num_experts = draw(st.integers(2 if routing == "shared" else 1, 16))
    return dict(
        routing=routing,
        top_p=draw(st.sampled_from([1e-3, 0.25, 0.5, 0.9, 1.0]) | st.floats(0.01, 1.0)),
        kind=draw(st.sampled_from(["linear", "linear", "conv1d", "conv2d"])),
        out_features=draw(st.integers(1, 300)),
        in_features=draw(st.integers(1, 300)),
        num_experts=num_experts,
        top_k=draw(st.integers(1, num_experts - (routing == "shared"))),
        expert_rank=draw(st.integers(1, 4)),
        tokens=draw(st.sampled_from(["2d", "3d", "empty-2d", "empty-3d"])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        router_scale=draw(st.sampled_from([0.0, 1.0, 30.0])),
        seed=draw(st.integers(0, 2**20)),
    )


def build(case):
    g = torch.Generator().manual_seed(case["seed"])
    m, n, E, d = case["out_features"], case["in_features"], case["num_experts"], case["expert_rank"]
    if case["kind"] == "linear":
        base = nn.Linear(n, m)
    elif case["kind"] == "conv1d":
        base = Conv1D(m, n)
        nn.init.normal_(base.weight, std=0.1, generator=g)
    else:
        base = nn.Conv2d(n, m, kernel_size=1)
    base = base.to(case["dtype"])
    factors = F.ExpertFactors(
        torch.randn(E * d, n, generator=g) / n**0.5,
        torch.randn(m, E * d, generator=g) / (E * d) ** 0.5,
        torch.rand(E, generator=g) + 0.5,
    )
    coefs = F.expected_expert_weights(case["routing"], E)
    layer = GoatLayer(
        base,
        factors,
        top_k=case["top_k"],
        residual_coef=coefs,
        routing=case["routing"],
        top_p=case["top_p"],
        generator=g,
    )
    with torch.no_grad():
        layer.router.weight.mul_(case["router_scale"])
    batch = 0 if case["tokens"].startswith("empty") else 3
    if case["kind"] == "conv2d":
        shape = (batch, n, 2, 3) if case["tokens"].endswith("3d") else (batch, n, 1, 1)
    else:
        shape = (batch, n) if case["tokens"].endswith("2d") else (2, batch, n)
    x = torch.randn(shape, generator=g).to(case["dtype"])
    return layer, x


@settings(max_examples=90, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=layer_cases())
def test_batched_layer_equals_loop_reference(case):
    layer, x = build(case)
    outputs, grads = [], []
    params = (layer.router.weight, layer.lora_A, layer.lora_B)
    for forward in (layer.forward, layer.forward_loop_reference):
        layer.zero_grad()
        y = forward(x)
        assert y.dtype == case["dtype"] and y.shape == layer.base_layer(x).shape
        y.float().sum().backward()
        outputs.append(y.detach().float())
        # None when no token reached a parameter's graph (empty batch)
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])
    batched, loop = outputs
    assert not torch.isnan(batched).any()
    if case["dtype"] == torch.bfloat16:
        # the delta is cast to bf16 and added to the bf16 base output: each path rounds twice, each time by
        # at most u = 2^-8 of the addends (not of the result, which can cancel), so 4 u (|base| + |delta|)
        with torch.no_grad():
            base_out = layer.base_layer(x).float()
        bound = 2**-6 * (base_out.abs() + (loop - base_out).abs()) + 1e-4
        assert torch.all((batched - loop).abs() <= bound), float(((batched - loop).abs() - bound).max())
    else:
        torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-4)
    if case["dtype"] == torch.float32:
        for name, batched_grad, loop_grad in zip(("router", "lora_A", "lora_B"), *grads):
            torch.testing.assert_close(batched_grad, loop_grad, atol=1e-4, rtol=1e-3, msg=name)

    tokens = layer._to_tokens(x).float()
    routing = F.route(layer.router(tokens), case["top_k"], case["routing"], case["top_p"])
    shared = int(case["routing"] == "shared")
    assert routing.weights.shape[-1] == case["num_experts"] and routing.probs.shape[-1] == case["num_experts"] - shared
    if tokens.shape[0]:
        torch.testing.assert_close(routing.weights[:, shared:].sum(-1), torch.ones(tokens.shape[0]))
        assert torch.all(routing.weights[:, :shared] == 1) and torch.all(routing.used[:, :shared])
        routed = routing.used[:, shared:].sum(-1)
        if case["routing"] == "top_p":
            kept = torch.where(routing.used, routing.probs, 0.0).sum(-1)
            assert torch.all((kept >= case["top_p"] - 1e-5) | (routed == case["num_experts"]))
        else:
            assert torch.all(routed == case["top_k"])
    aux = layer.aux_loss()
    aux = aux.detach()
    assert torch.isfinite(aux)
    if not tokens.shape[0]:
        assert float(aux) == 0.0
