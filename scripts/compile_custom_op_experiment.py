"""An experiment, not a feature: GOAT's router, routing and experts (functional._RoutedExperts) wrapped as
opaque torch.library custom ops, so that under torch.compile dynamo traces one call per adapted layer and
inductor generates none of the routing's kernels. It measures what GOAT's compile time and compiled step
would be if the adapter were one graph node (docs/benchmarks.md, "Compile time on 2026-12-07" and
"The adapter as an opaque operator, compiled whole").

    customop    forward and backward both custom ops: inductor sees neither
    forward-op  the forward a custom op, its backward traced (inductor fuses the backward only)
    base        GOAT as it is (the adapter traced through, inductor fuses it)

    python scripts/compile_custom_op_experiment.py check                    # same loss and gradients as GOAT
    python scripts/compile_custom_op_experiment.py customop|forward-op|base [--style whole|regional] [--model M]
                                                                             # compile once, time it
    python scripts/compile_custom_op_experiment.py steps [--model M]        # compiled whole, steady steps of the
                                                                             # three and LoRA in one round robin

Run each timing in a fresh process with TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_FX_GRAPH_CACHE=0
TORCHINDUCTOR_AUTOGRAD_CACHE=0, as goat bench --compile-time does; `steps` compiles all four in one process
(the step time does not depend on the cache)."""

from __future__ import annotations

import argparse
import statistics
import time
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


def _routed_forward(
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


def _routed_forward_fake(x, G, A, B, scale, keep, top_k, mode, top_p):
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


def _routed_grads(grad_delta, grad_probs, saved, keep) -> tuple:
    """_RoutedExperts.backward's gradients of x, G, A and B (None where none reaches them)."""
    x, G, A, B, probs, weights, coef, hidden, scaled = saved
    ctx = types.SimpleNamespace(
        saved_tensors=(x, keep, G, A, B, probs, weights, coef, hidden, scaled), needs_input_grad=(True,) * 9
    )
    return F._RoutedExperts.backward(ctx, grad_delta, grad_probs, None, None)[:4]


@torch.library.custom_op("goat_experiment::routed_backward", mutates_args=())
def routed_backward(
    grad_delta: Tensor | None,
    grad_probs: Tensor | None,
    saved: list[Tensor],
    keep: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of x, G, A and B (zeros where none reaches them)."""
    grads = _routed_grads(grad_delta, grad_probs, saved, keep)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, saved[:4]))


@routed_backward.register_fake
def _(grad_delta, grad_probs, saved, keep):
    return tuple(torch.empty_like(t) for t in saved[:4])


def _setup_context(ctx, inputs, output):
    x, G, A, B, _, keep, *_ = inputs
    _, probs, _, weights, coef, hidden, scaled = output
    ctx.save_for_backward(x, G, A, B, probs, weights, coef, hidden, scaled, keep)


def _opaque_backward(ctx, grad_delta, grad_probs, *_unused):
    """customop: the backward as one more custom op."""
    *saved, keep = ctx.saved_tensors
    return (*routed_backward(grad_delta, grad_probs, saved, keep), None, None, None, None, None)


def _traced_backward(ctx, grad_delta, grad_probs, *_unused):
    """forward-op: the same backward traced, not opaque: _RoutedExperts.backward's ops straight into the graph."""
    *saved, keep = ctx.saved_tensors
    return (*_routed_grads(grad_delta, grad_probs, saved, keep), None, None, None, None, None)


def _routed_experts_through(name: str, backward):
    """functional.routed_experts through the forward as the custom op `name`, with `backward` as its autograd."""
    op = torch.library.custom_op(f"goat_experiment::{name}", mutates_args=())(_routed_forward)
    op.register_fake(_routed_forward_fake)
    op.register_autograd(backward, setup_context=_setup_context)

    def routed_experts(x, router_weight, A, B, expert_scale, keep=None, top_k=2, mode="top_k", top_p=0.25):
        outputs = op(x, router_weight, A, B, expert_scale, keep, top_k, RoutingMode(mode).value, top_p)
        return outputs[0], F.Routing(*outputs[1:4])

    return routed_experts


VARIANTS = {
    "base": F.routed_experts,
    "customop": _routed_experts_through("routed_forward", _opaque_backward),
    "forward-op": _routed_experts_through("routed_forward_only", _traced_backward),
}


def _bench_args(extra: dict | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    args = parser.parse_args([])
    vars(args).update(extra or {})
    return args


def _check() -> None:
    """Loss and gradients of a tiny BERT's GOAT step equal through every variant (no dropout: eval mode)."""
    args = _bench_args()
    base = common.load_model("tiny-bert", 0)
    batch = common.random_batch(base, 4, 16, 0)
    results = {}
    for name, function in VARIANTS.items():
        F.routed_experts = function
        model = common.build_method("goat", base, args).eval()
        loss = model(**batch).loss + 1e-3 * model.aux_loss()
        loss.backward()
        results[name] = (loss.item(), [p.grad for p in model.parameters() if p.requires_grad])
    F.routed_experts = VARIANTS["base"]
    reference = results["base"]
    for name, (loss, grads) in results.items():
        gap = max((a - b).abs().max().item() for a, b in zip(reference[1], grads))
        print(f"{name}: loss {loss:.6f} (base {reference[0]:.6f}), largest gradient gap to base {gap:.2e}")


def _steps(model_name: str, steps: int = 10) -> None:
    """GOAT's three variants and LoRA compiled whole in one process, then `steps` round robins of one training step
    each; the median step of each and its ratio to base. F.routed_experts is set to a variant's own function
    before each of its steps: dynamo guards on it, and a step under another variant's function would recompile."""
    args = _bench_args({"compile_backend": "inductor"})
    base_model = common.load_model(model_name, args.seed)
    batch_size, seq_len = common.MODEL_SHAPES.get(model_name, (8, 128))
    batch = common.random_batch(base_model, batch_size, seq_len, args.seed)
    runners = {}
    for name in (*VARIANTS, "lora"):
        method = "lora" if name == "lora" else "goat"
        F.routed_experts = VARIANTS.get(name, VARIANTS["base"])
        model = common.build_method(method, base_model, args)
        runner = common.Runner(method, model, batch, torch.device("cpu"))
        runner.forward = torch.compile(model, fullgraph=method == "goat")
        start = time.perf_counter()
        runner.train_step()
        runner.train_step()
        print(f"{name}: compiled and two steps in {time.perf_counter() - start:.1f} s", flush=True)
        runners[name] = runner
    times = {name: [] for name in runners}
    for _ in range(steps):
        for name, runner in runners.items():
            F.routed_experts = VARIANTS.get(name, VARIANTS["base"])
            start = time.perf_counter()
            runner.train_step()
            times[name].append(time.perf_counter() - start)
    F.routed_experts = VARIANTS["base"]
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(
            f"{name:<10} median step {median:.3f} s (min {min(times[name]):.3f}), "
            f"/ base {median / medians['base']:.3f}, / LoRA {median / medians['lora']:.3f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("check", "steps", *VARIANTS))
    parser.add_argument("--style", choices=("whole", "regional"), default="regional")
    parser.add_argument("--model", default="minilm")
    cli = parser.parse_args()
    if cli.what == "check":
        _check()
    elif cli.what == "steps":
        _steps(cli.model)
    else:
        F.routed_experts = VARIANTS[cli.what]  # what GoatLayer calls
        options = {"compile_backend": "inductor"}
        print(cli.what, cli.style, compile_time.compile_once(cli.model, "goat", cli.style, options))
