"""An experiment, not a feature: GOAT's router, routing and experts (functional._RoutedExperts) wrapped as two
opaque torch.library custom ops, forward and backward, so that under torch.compile dynamo traces one call
per adapted layer and inductor generates none of the routing's kernels. It measures what GOAT's compile
time would be if the adapter were one graph node (docs/benchmarks.md, "Compile time on 2026-12-07").

    python scripts/compile_custom_op_experiment.py check               # same loss and gradients as GOAT
    python scripts/compile_custom_op_experiment.py customop|base       # compile MiniLM regionally, time it

Run each timing in a fresh process with TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_FX_GRAPH_CACHE=0
TORCHINDUCTOR_AUTOGRAD_CACHE=0, as goat bench --compile-time does."""

from __future__ import annotations

import argparse
import sys
import types

import torch
from torch import Tensor

from goat_lora import bench
from goat_lora import functional as F
from goat_lora.bench import common, compile_time
from goat_lora.config import RoutingMode


class _SavingContext:
    """What _RoutedExperts.forward calls on its ctx; keeps what it saves."""

    saved: tuple = ()

    def save_for_backward(self, *tensors):
        self.saved = tensors

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


@torch.library.custom_op("goat_experiment::routed_forward", mutates_args=())
def routed_forward(
    x: Tensor,
    G: Tensor,
    A: Tensor,
    B: Tensor,
    scale: Tensor,
    keep: Tensor | None,
    top_k: int,
    mode: str,
    top_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """delta, probs, used, weights, and the coef, hidden, scaled that the backward needs."""
    ctx = _SavingContext()
    delta, probs, used, weights = F._RoutedExperts.forward(
        ctx, x, G, A, B, scale, keep, top_k, RoutingMode(mode), top_p
    )
    return delta, probs, used, weights, *ctx.saved[7:10]


@routed_forward.register_fake
def _(x, G, A, B, scale, keep, top_k, mode, top_p):
    tokens, experts, rank, routed, out = x.shape[0], scale.shape[0], A.shape[0], G.shape[0], B.shape[0]
    return (
        x.new_empty(tokens, out),
        x.new_empty(tokens, routed, dtype=torch.float32),
        x.new_empty(tokens, experts, dtype=torch.bool),
        x.new_empty(tokens, experts, dtype=torch.float32),
        x.new_empty(tokens, experts),
        x.new_empty(tokens, rank),
        x.new_empty(tokens, rank),
    )


@torch.library.custom_op("goat_experiment::routed_backward", mutates_args=())
def routed_backward(
    grad_delta: Tensor | None,
    grad_probs: Tensor | None,
    saved: list[Tensor],
    keep: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of x, G, A and B (zeros where none reaches them)."""
    x, G, A, B, probs, weights, coef, hidden, scaled = saved
    ctx = types.SimpleNamespace(
        saved_tensors=(x, keep, G, A, B, probs, weights, coef, hidden, scaled), needs_input_grad=(True,) * 9
    )
    grads = F._RoutedExperts.backward(ctx, grad_delta, grad_probs, None, None)[:4]
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x, G, A, B)))


@routed_backward.register_fake
def _(grad_delta, grad_probs, saved, keep):
    return tuple(torch.empty_like(t) for t in saved[:4])


def _setup_context(ctx, inputs, output):
    x, G, A, B, _, keep, *_ = inputs
    _, probs, _, weights, coef, hidden, scaled = output
    ctx.save_for_backward(x, G, A, B, probs, weights, coef, hidden, scaled, keep)


def _backward(ctx, grad_delta, grad_probs, *_unused):
    *saved, keep = ctx.saved_tensors
    return (*routed_backward(grad_delta, grad_probs, saved, keep), None, None, None, None, None)


routed_forward.register_autograd(_backward, setup_context=_setup_context)


def routed_experts(x, router_weight, A, B, expert_scale, keep=None, top_k=2, mode="top_k", top_p=0.25):
    """functional.routed_experts through the custom ops."""
    outputs = routed_forward(x, router_weight, A, B, expert_scale, keep, top_k, RoutingMode(mode).value, top_p)
    return outputs[0], F.Routing(*outputs[1:4])


def _check() -> None:
    """Loss and gradients of a tiny BERT's GOAT step equal through both paths (no dropout: eval mode)."""
    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    args = parser.parse_args([])
    base = common.load_model("tiny-bert", 0)
    batch = common.random_batch(base, 4, 16, 0)
    results, reference = [], F.routed_experts
    for function in (reference, routed_experts):
        F.routed_experts = function
        model = common.build_method("goat", base, args).eval()
        loss = model(**batch).loss + 1e-3 * model.aux_loss()
        loss.backward()
        results.append((loss.item(), [p.grad for p in model.parameters() if p.requires_grad]))
    F.routed_experts = reference
    gap = max((a - b).abs().max().item() for a, b in zip(results[0][1], results[1][1]))
    print(f"loss {results[0][0]:.6f} / {results[1][0]:.6f}, largest gradient gap {gap:.2e}")


if __name__ == "__main__":
    if sys.argv[1] == "check":
        _check()
    else:
        if sys.argv[1] == "customop":
            F.routed_experts = routed_experts  # what GoatLayer calls
        options = {"compile_backend": "inductor"}
        print(sys.argv[1], compile_time.compile_once("minilm", "goat", "regional", options))
