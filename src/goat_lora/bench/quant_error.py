"""The quantization-error table: QLoRA's base W0 against GOAT's W0 - W_res, quantized alike."""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from .. import functional as F
from .common import tiny_model
from .init import LayerBlock, layer_shapes


QUANT_KINDS = ("nf4", "fp4", "int8")
_ERROR_COLUMNS = ("qlora", "goat", "pissa", "goat_unload", "requantize")


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def quant_error_sums(weights: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, dict]:
    r"""Per matrix W0 (float32 (m, n)) and kind, squared Frobenius norms (float64) of the errors, each
    against its own reference:

      qlora        deq(Q(W0)) - W0                              QLoRA's base
      goat         deq(Q(W0 - W_res)) - (W0 - W_res)            GOAT's base (GoatConfig.quantize)
      pissa        deq(Q(W0 - P_r)) - (W0 - P_r)                QPiSSA's base, P_r = W0's top r components
      goat_unload  deq(Q(W0 - W_res)) - W0                      what GOAT's unload() returns, against W0
      requantize   deq(Q(deq(Q(W0)) - W_res)) + W_res - deq(Q(W0))   re-quantizing a quantized base: how far
                   the start moves from the quantized model (the run-time residual moves it by 0)

    and the squared norms of the references, and |W_res|^2. GOAT's factors: r, E from args, as
    get_goat_model computes them (svd_method "auto")."""
    from .. import quant
    from ..config import GoatConfig
    from ..inject import all_initial_factors, layer_generator
    from ..svd import batched_singular_components

    config = GoatConfig(r=args.rank, num_experts=args.experts, top_k=min(args.top_k, args.experts))
    modules = {name: _linear(weight) for name, weight in weights.items()}
    factors = all_initial_factors(modules, config, {n: layer_generator(config.seed, i) for i, n in enumerate(weights)})
    sums: dict[str, dict] = {}
    for name, W0 in weights.items():
        W0 = W0.float()
        W_res = F.residual_weight(factors[name], torch.tensor(config.residual_coefs))
        ((U, S, V),) = batched_singular_components([W0], torch.arange(args.rank)[None], "auto")
        P_r = (U * S) @ V.T  # top-r components: PiSSA's s B A
        entry = {
            "norm2": _norm2(W0),
            "goat_norm2": _norm2(W0 - W_res),
            "pissa_norm2": _norm2(W0 - P_r),
            "residual_norm2": _norm2(W_res),
        }
        for kind in QUANT_KINDS:
            spec = quant.QuantSpec(kind)

            def q(w: torch.Tensor) -> torch.Tensor:
                return quant.dequantized_weight(quant.quantize_linear(w, None, spec, torch.float32))

            q_w0, q_goat = q(W0), q(W0 - W_res)
            entry[kind] = {
                "qlora": _norm2(q_w0 - W0),
                "goat": _norm2(q_goat - (W0 - W_res)),
                "pissa": _norm2(q(W0 - P_r) - (W0 - P_r)),
                "goat_unload": _norm2(q_goat - W0),
                "requantize": _norm2(q(q_w0 - W_res) + W_res - q_w0),
                "quantized_norm2": _norm2(q_w0),
            }
        sums[name] = entry
    return sums


def _norm2(t: torch.Tensor) -> float:
    return float(torch.linalg.norm(t.double()) ** 2)


def summarise_quant_errors(sums: dict[str, dict], group) -> dict[str, dict]:
    """Relative errors per group of matrices (group(name) -> e.g. "q_proj"): sqrt(sum of squared errors /
    sum of squared reference norms), i.e. the relative error of all that group's matrices together."""
    groups: dict[str, list[dict]] = {}
    for name, entry in sums.items():
        groups.setdefault(group(name), []).append(entry)
    out = {}
    for key, entries in groups.items():

        def total(field: str, kind: str | None = None) -> float:
            return sum((e[kind] if kind else e)[field] for e in entries)

        row = {"matrices": len(entries), "residual_rel": math.sqrt(total("residual_norm2") / total("norm2"))}
        for kind in QUANT_KINDS:
            row[kind] = {
                "qlora": math.sqrt(total("qlora", kind) / total("norm2")),
                "goat": math.sqrt(total("goat", kind) / total("goat_norm2")),
                "pissa": math.sqrt(total("pissa", kind) / total("pissa_norm2")),
                "goat_unload": math.sqrt(total("goat_unload", kind) / total("norm2")),
                "requantize": math.sqrt(total("requantize", kind) / total("quantized_norm2", kind)),
            }
            row[kind]["goat_over_qlora"] = row[kind]["goat"] / row[kind]["qlora"]
        out[key] = row
    return out


def bench_quant_error(args: argparse.Namespace, device: torch.device) -> dict:
    """The table of --quant-error: SmolLM2-135M per layer type (or, with --smoke, a tiny random LLaMA),
    and one LLaMA-2-7B-shaped layer (random Kaiming-uniform weights, as --init; smaller with --smoke)."""
    from ..inject import find_target_modules
    from ..config import GoatConfig

    if args.smoke:
        # 64 wide: bitsandbytes quantizes in blocks of 64 weights, and its 0.50 CPU dequantization garbles
        # rows narrower than a block on AVX512-BF16 CPUs (no real model's layers are that narrow)
        model = tiny_model("tiny-llama", args.seed, width=64)
        source = "tiny random LLaMA (smoke)"
    else:
        from .. import hf

        model = hf.load_causal_lm("smollm2", dtype=torch.float32)
        source = "SmolLM2-135M-Instruct (shipped GGUF, dequantised to float32)"
    names = find_target_modules(model, GoatConfig())
    weights = {name: model.get_submodule(name).weight.detach().float().to(device) for name in names}
    del model
    small = summarise_quant_errors(quant_error_sums(weights, args), lambda name: name.rsplit(".", 1)[-1])
    block = LayerBlock(layer_shapes(args.smoke), args.seed)
    weights = {name: getattr(block, name).weight.detach().to(device) for name, _, _ in layer_shapes(args.smoke)}
    del block
    large = summarise_quant_errors(quant_error_sums(weights, args), lambda name: name)
    return {
        "rank": args.rank,
        "experts": args.experts,
        "models": {source: small, "one LLaMA-2-7B-shaped layer (random Kaiming-uniform weights)": large},
    }


def format_quant_error_table(figures: dict) -> str:
    lines = [
        f"relative quantization error |deq(Q(W)) - W|_F / |W|_F of the frozen base, r={figures['rank']} "
        f"E={figures['experts']}; QLoRA: W = W0; GOAT: W = W0 - W_res; QPiSSA: W = W0 - top-r components; "
        f"unload: |deq(Q(W0 - W_res)) - W0| / |W0|; re-quantize: moving an already quantized base by W_res",
    ]
    for source, rows in figures["models"].items():
        lines.append(f"{source}")
        lines.append(
            f"  {'layer':<10} {'|W_res|/|W0|':>12} {'kind':>5} {'QLoRA':>8} {'GOAT':>8} {'GOAT/QLoRA':>10} "
            f"{'QPiSSA':>8} {'unload':>8} {'requant':>8}"
        )
        for name, row in rows.items():
            for kind in QUANT_KINDS:
                first = kind == QUANT_KINDS[0]
                e, residual = row[kind], f"{row['residual_rel']:.5f}" if first else ""
                lines.append(
                    f"  {name if first else '':<10} {residual:>12} {kind:>5} {e['qlora']:>8.5f} {e['goat']:>8.5f} "
                    f"{e['goat_over_qlora']:>10.5f} {e['pissa']:>8.5f} {e['goat_unload']:>8.5f} {e['requantize']:>8.5f}"
                )
    return "\n".join(lines)
