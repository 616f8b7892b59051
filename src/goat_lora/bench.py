r"""`goat bench`: GOAT against peft's LoRA at equal total rank, measured side by side in one run.

Two benchmarks (figures and their meaning: docs/benchmarks.md):

* the step benchmark (default): for each model, five copies of one sequence classifier are trained
  on the same random batch, one per method:

      head         frozen base, trainable classification head only
      lora         peft LoRA of rank r on every Linear (lora_alpha = 2r, dropout 0.05)
      goat         GOAT (r, E, k) on every Linear: experts of rank d = r / E, batched path
      goat_loop    the same GOAT model running GoatLayer.forward_loop_reference (this project's lean
                   per-expert loop)
      goat_public  the same GOAT model, each layer's forward replaced by a reproduction of the public
                   GOAT layer's forward (Facico/GOAT-PEFT; see _public_layer_forward), for timing only

  Two more methods, run only when named in --methods, time GOAT's routing variants:

      goat_top_p   GOAT with routing="top_p" (--top-p, default 0.25)
      goat_shared  GOAT with routing="shared": expert 0 always on, top-k of the other E - 1

  Their step times are reported against goat's (same round robin) as "top_p_step" / "shared_step".

  With --compile the methods are lora and goat, eager, wrapped in torch.compile (lora_compiled,
  goat_compiled; GOAT with fullgraph=True) and compiled with mode="reduce-overhead" (lora_cudagraphs,
  goat_cudagraphs: CUDA graphs on CUDA; on the CPU the default mode's code again), in the same round robin. A compiled
  method's first training step (and first eval forward) includes compiling it: its compile time is
  reported as that first call minus the steady median, apart from the step time. Ratios:
  "compiled_step" goat_compiled / lora_compiled, "compiled_memory" likewise, "cudagraph_step"
  goat_cudagraphs / lora_cudagraphs, "compile_speedup" goat / goat_compiled (eager GOAT's step over
  compiled GOAT's).

  The loop target (GOAT >= 2.2x faster than the per-expert loop) was derived from the public
  layer, so "loop_speedup" is goat_public's step time / goat's. goat_loop / goat is reported as
  "lean_loop_speedup", for information, without a target.

  Each repetition runs one training step (forward, backward, AdamW step) of every method in turn
  (round robin), so background load on the machine hits all methods alike; after the warm-up
  repetitions the median and the spread (25th-75th percentile) are printed. Ratios to LoRA are the
  median over repetitions of the per-repetition ratio. Eval throughput is measured the same way
  (model.eval(), torch.inference_mode()). Peak memory: on CUDA torch.cuda.max_memory_allocated()
  over one step; on CPU the bytes of parameters, buffers and optimizer state plus the peak of the
  bytes allocated during one (separate, untimed) step, from the allocator events torch.profiler records.

* the initialisation benchmark (``--init``): adapting every target matrix of one LLaMA-2-7B-shaped
  decoder layer (q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008; random weights), with
  the public code's full float32 SVD per matrix (svd_method="exact") against this project's method
  (svd_method="auto"), plus each expert's subspace against the exact SVD's.

* on a quantized base (``--quantize nf4 | fp4 | int8``, bitsandbytes) the step benchmark's
  methods become

      lora          QLoRA: peft LoRA on the quantized W0 (the same quantizer as GOAT's)
      goat          GOAT quantizing its own base, Q(W0 - W_res) (GoatConfig.quantize)
      goat_runtime  GOAT on a base quantized beforehand (as transformers loads it): W_res x subtracted
                    at run time (GoatLayer.residual_at_runtime), for the cost of that route
      head          the quantized base with a trained head, on request

  with the targets GOAT / QLoRA step <= 1.10x and peak memory <= 1.05x.

* the quantization-error table (``--quant-error``): |deq(Q(W)) - W|_F / |W|_F of QLoRA's base (W = W0)
  and GOAT's (W = W0 - W_res), per layer type of SmolLM2-135M and of one LLaMA-2-7B-shaped layer
  (random weights), for nf4, fp4 and int8; beside them PiSSA's residual (W0 minus its top r
  components, QPiSSA's base) and the alignment error of re-quantizing an already quantized base.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from . import functional as F
from .layer import in_backward_recompute

METHODS = ("head", "lora", "goat", "goat_loop", "goat_public")  # the default set
# --compile: eager, torch.compile's default mode, and its reduce-overhead mode (CUDA graphs on CUDA; on the CPU
# the same code as the default mode, as there are no CUDA graphs), all in one round robin
COMPILE_METHODS = ("lora", "goat", "lora_compiled", "goat_compiled", "lora_cudagraphs", "goat_cudagraphs")
COMPILED_SUFFIXES = ("_compiled", "_cudagraphs")
ROUTING_METHODS = ("goat_top_p", "goat_shared")  # GOAT's routing variants, on request
QUANT_METHODS = ("lora", "goat", "goat_runtime")  # the default set with --quantize (head on request)
MODEL_SHAPES = {  # batch x tokens; "-arch": the same architecture with random weights
    "minilm": (32, 64), "smollm2": (8, 128), "minilm-arch": (32, 64), "smollm2-arch": (8, 128),
    "llama2-7b-2layers": (4, 512),  # the GPU stack: LLaMA-2-7B's shapes, 2 decoder layers
}
ARCHITECTURES = ("minilm-arch", "smollm2-arch", "llama2-7b-2layers")  # random weights, built from a config
TARGETS = {  # ratio to LoRA (GOAT / LoRA) and the bound; "loop_speedup" is public-layer time / GOAT time
    "step": ("<=", 1.10),
    "memory": ("<=", 1.10),
    "eval": (">=", 0.90),
    "loop_speedup": (">=", 2.2),
    "compiled_step": ("<=", 1.15),  # compiled GOAT against compiled LoRA
    "compiled_memory": ("<=", 1.05),
    "cudagraph_step": ("<=", 1.05),  # GOAT against LoRA, both compiled with CUDA graphs
}
QUANT_TARGETS = {**TARGETS, "memory": ("<=", 1.05)}  # on a quantized base: GOAT / QLoRA
INIT_TARGET = 4.0  # exact SVD time / this project's time
LLAMA7B_LAYER = (  # (name, out, in) of one LLaMA-2-7B decoder layer's adapted matrices
    ("q_proj", 4096, 4096),
    ("k_proj", 4096, 4096),
    ("v_proj", 4096, 4096),
    ("o_proj", 4096, 4096),
    ("gate_proj", 11008, 4096),
    ("up_proj", 11008, 4096),
    ("down_proj", 4096, 11008),
)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `goat bench` (the CLI registers them on its `bench` subcommand)."""
    parser.add_argument(
        "--models",
        nargs="+",
        default=["minilm", "smollm2"],
        help="models to benchmark: minilm (batch 32x64), smollm2 (batch 8x128), minilm-arch / smollm2-arch (their "
        "architectures with random weights, no model package needed), llama2-7b-2layers (LLaMA-2-7B's shapes, 2 "
        "decoder layers, random weights, batch 4x512), or a local path / hub name (batch 8x128 unless "
        "--batch-size/--seq-len); default: minilm smollm2",
    )
    parser.add_argument("--steps", type=int, default=10, help="measured repetitions per method (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up repetitions, not measured (default 2)")
    parser.add_argument("--rank", type=int, default=8, help="total rank r of LoRA and of GOAT's experts (default 8)")
    parser.add_argument("--experts", type=int, default=8, help="GOAT experts E (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="GOAT experts per token k (default 2)")
    parser.add_argument(
        "--top-p", type=float, default=0.25, help="probability mass of method goat_top_p's experts (default 0.25)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="override the model's batch size")
    parser.add_argument("--seq-len", type=int, default=None, help="override the model's tokens per example")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS + ROUTING_METHODS + ("goat_runtime",) + COMPILE_METHODS[2:],
        help="methods to run (default: the first five; goat_top_p and goat_shared time GOAT's routing variants; "
        "with --quantize: lora goat goat_runtime, and head on request; with --compile lora, goat, lora_compiled, "
        "goat_compiled, lora_cudagraphs and goat_cudagraphs)",
    )
    parser.add_argument(
        "--quantize",
        default=None,
        choices=("nf4", "fp4", "int8"),
        help="quantize the base with bitsandbytes: lora becomes QLoRA, goat quantizes W0 - W_res itself, goat_runtime "
        "adapts a base quantized beforehand (targets: step <= 1.10x, memory <= 1.05x QLoRA)",
    )
    parser.add_argument(
        "--quant-error",
        action="store_true",
        help="the quantization-error table instead: QLoRA's base W0 against GOAT's W0 - W_res, per layer type of "
        "SmolLM2-135M and of one LLaMA-2-7B-shaped layer, for nf4, fp4 and int8",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile: time compiled GOAT against compiled peft LoRA, and both eager, in one round robin; "
        "compile time reported apart",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        choices=("inductor", "aot_eager", "eager"),
        help="torch.compile backend for --compile (default inductor; eager and aot_eager only check that it runs)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast around every step and eval (as goat train --bf16: weights, adapters and optimizer "
        "state stay float32)",
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the eval-throughput measurement")
    parser.add_argument(
        "--init",
        action="store_true",
        help="benchmark initialisation instead: one LLaMA-2-7B-shaped layer, exact SVD vs this project's method",
    )
    parser.add_argument("--init-repeats", type=int, default=1, help="repetitions of the --init timing (default 1)")
    parser.add_argument(
        "--ops",
        action="store_true",
        help="count compute ops instead (the CPU proxy of GPU kernels): one bf16 training step and one eval "
        "forward, GOAT against peft LoRA, on a tiny LLaMA and the MiniLM architecture (target: train <= 1.4x)",
    )
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the figures to FILE (JSON)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny random models, few steps (seconds); checks that the benchmark runs"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, batches and routers (default 0)")


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark selected by `args`, print its table, write --json; exit status 0."""
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_methods(args)
    device = _pick_device(args.device)
    meta = _meta(args, device)
    if args.quant_error:
        result = {"meta": meta, "quant_error": bench_quant_error(args, device)}
        print(format_quant_error_table(result["quant_error"]))
    elif args.init:
        result = {"meta": meta, "init": bench_init(args, device)}
        print(format_init_table(result["init"]))
    elif args.ops:
        result = {"meta": meta, "ops": {name: count_step_ops(name, args) for name in OPS_MODELS}}
        print(format_ops_table(result["ops"]))
    else:
        if args.compile and args.methods == list(METHODS):  # the default set: --compile has its own
            args.methods = list(COMPILE_METHODS)
        tiny = [m for m in args.models if m.startswith("tiny-")]  # --smoke may name one of its two models
        models = {}
        for name in ((tiny or ["tiny-bert", "tiny-llama"]) if args.smoke else args.models):
            models[name] = bench_model(name, args, device)
            print(format_model_table(name, models[name]))
            print(flush=True)
        result = {"meta": meta, "models": models}
    if args.json:
        from .config import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"figures written to {args.json}")
    return 0


def _check_methods(args: argparse.Namespace) -> None:
    """With --quantize the default methods become QUANT_METHODS; refuse what does not fit (one line each)."""
    quantize = getattr(args, "quantize", None)
    if quantize and args.methods == list(METHODS):
        args.methods = list(QUANT_METHODS)
    if quantize:
        from . import quant

        try:
            quant.bitsandbytes()
        except ImportError:
            raise SystemExit(f"goat bench: error: --quantize {quantize} needs bitsandbytes: "
                             f"{quant.INSTALL_HINT}") from None  # fmt: skip
        other = [m for m in args.methods if m not in QUANT_METHODS + ("head",)]
        if other:
            raise SystemExit(f"goat bench: error: --quantize runs {', '.join(QUANT_METHODS)} and head; "
                             f"not {', '.join(other)}")  # fmt: skip
    elif "goat_runtime" in args.methods:
        raise SystemExit("goat bench: error: method goat_runtime needs --quantize (it adapts a quantized base)")


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def _git_commit() -> str | None:
    """The checkout's commit (with "+dirty" for uncommitted changes), or None outside a git checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def _meta(args: argparse.Namespace, device: torch.device) -> dict:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "rank": args.rank,
        "experts": args.experts,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "quantize": getattr(args, "quantize", None),
        "steps": args.steps if not args.smoke else min(args.steps, 2),
        "warmup": args.warmup if not args.smoke else 1,
        "smoke": bool(args.smoke),
        "git_commit": _git_commit(),
        "compile_backend": args.compile_backend if getattr(args, "compile", False) else None,
        "bf16_autocast": bool(getattr(args, "bf16", False)),
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    return meta


# ------------------------------------------------------------------------------------------------
# models and methods
# ------------------------------------------------------------------------------------------------


def _tiny_model(name: str, seed: int, width: int = 32) -> nn.Module:
    """A seeded random sequence classifier a few layers deep, `width` wide (for --smoke and the test suite)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    if name == "tiny-bert":
        config = BertConfig(
            vocab_size=128, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=2 * width, max_position_embeddings=64, num_labels=2,
        )
        return BertForSequenceClassification(config)
    config = LlamaConfig(
        vocab_size=128, hidden_size=width, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=2 * width, max_position_embeddings=64, num_labels=2, pad_token_id=0,
    )
    return LlamaForSequenceClassification(config)


def architecture_config(name: str):
    """The transformers config of a random-weight benchmark model (ARCHITECTURES): MiniLM's or
    SmolLM2-135M's exact architecture (the same step cost without the weights, for machines where the
    model packages are not installed, such as a GPU box), or LLaMA-2-7B's shapes with 2 decoder layers."""
    from transformers import BertConfig, LlamaConfig

    if name == "minilm-arch":  # all-MiniLM-L6-v2
        return BertConfig(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
            max_position_embeddings=512, num_labels=2,
        )
    if name == "smollm2-arch":  # SmolLM2-135M
        return LlamaConfig(
            vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            intermediate_size=1536, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_theta=100000.0, num_labels=2, pad_token_id=2,
        )
    if name == "llama2-7b-2layers":  # meta-llama/Llama-2-7b-hf's layer shapes, 2 of its 32 layers
        return LlamaConfig(
            vocab_size=32000, hidden_size=4096, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32,
            intermediate_size=11008, max_position_embeddings=4096, rms_norm_eps=1e-5, num_labels=2, pad_token_id=0,
        )
    raise ValueError(f"unknown benchmark architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")


def _architecture_model(name: str, seed: int) -> nn.Module:
    """A sequence classifier with the architecture `name` and random weights."""
    from transformers import BertForSequenceClassification, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = architecture_config(name)
    model_class = BertForSequenceClassification if config.model_type == "bert" else LlamaForSequenceClassification
    return model_class(config)


def _load_model(name: str, seed: int) -> nn.Module:
    if name.startswith("tiny-"):
        return _tiny_model(name, seed)
    if name in ARCHITECTURES:
        return _architecture_model(name, seed)
    from . import hf

    return hf.load_sequence_classifier(name, 2, dtype=torch.float32)


def _head_names(model: nn.Module) -> list[str]:
    from .hf import default_modules_to_save

    heads = default_modules_to_save(model)
    if not heads:
        raise ValueError(f"{type(model).__name__} has no 'classifier' or 'score' head to train")
    return heads


def build_method(method: str, base: nn.Module, args: argparse.Namespace) -> nn.Module:
    """A fresh copy of `base` adapted by `method`, with only that method's parameters trainable. With
    --quantize every base but goat's (which quantizes W0 - W_res itself) is quantized first; a "_compiled"
    method is built as its eager twin (_Runner compiles it)."""
    for suffix in COMPILED_SUFFIXES:
        method = method.removesuffix(suffix)
    model = copy.deepcopy(base)
    heads = _head_names(model)
    quantize = getattr(args, "quantize", None)
    if quantize and method != "goat":
        from . import quant
        from .config import GoatConfig
        from .inject import find_target_modules

        targets = find_target_modules(model, GoatConfig(modules_to_save=heads))  # every Linear but the head
        quant.quantize_modules(model, targets, quant.QuantSpec(quantize))
    if method == "head":
        for name, param in model.named_parameters():
            param.requires_grad_(any(name == h or name.startswith(h + ".") for h in heads))
        return model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules="all-linear",
            modules_to_save=heads,
        )
        return get_peft_model(model, config)
    from .config import GoatConfig
    from .model import get_goat_model

    routing = {"goat_top_p": "top_p", "goat_shared": "shared"}.get(method, "top_k")
    config = GoatConfig(
        r=args.rank, num_experts=args.experts, top_k=args.top_k, modules_to_save=heads, seed=args.seed,
        routing=routing, top_p=args.top_p, quantize=quantize if method == "goat" else None,
    )
    goat = get_goat_model(model, config)
    if method == "goat_loop":
        for layer in goat.goat_layers():
            layer.forward = layer.forward_loop_reference  # the per-expert Python loop
    elif method == "goat_public":
        for layer in goat.goat_layers():
            use_public_layer_forward(layer)
    return goat


def use_public_layer_forward(layer: nn.Module) -> None:
    """Make `layer` (a GoatLayer around an nn.Linear) run `_public_layer_forward`: adds one dropout
    module per expert (as the public layer's experts each own one) and the scales s_j as Python floats
    (the public experts keep a float attribute; reading them once here avoids a device sync per step)."""
    _require_linear(layer)
    p = layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0
    layer.public_dropouts = nn.ModuleList(  # a submodule list, so model.train() / .eval() reach them
        nn.Dropout(p) if p > 0 else nn.Identity() for _ in range(layer.num_experts)
    )
    layer.public_scales = [float(s) for s in layer.expert_scale.tolist()]
    layer.forward = functools.partial(_public_layer_forward, layer)


def _require_linear(layer: nn.Module) -> None:
    if not isinstance(layer.base_layer, nn.Linear):
        raise TypeError(
            f"goat_public reproduces the public GOAT layer for nn.Linear only; this layer adapts a "
            f"{type(layer.base_layer).__name__}"
        )


def _public_layer_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    r"""The public GOAT layer's forward (Facico/GOAT-PEFT, TopKGOATLayer + GOATExpert), reproduced
    on this project's parameters, FOR TIMING ONLY (`goat bench` method goat_public).

    It computes the same function as GoatLayer.forward (the tests check logits and gradients with
    dropout off) but does the public layer's work, including its extra work:

    * base output; x cast to the adapter dtype and flattened to tokens (T, n);
    * gate p = softmax(router(tokens)); top-k of p; weights renormalised to sum 1;
    * the output buffer is zeros shaped like expert 0 applied to ALL T tokens: that pass (dropout,
      A_0, B_0, scale) really runs, and only its shape is kept;
    * for each expert j: (token_index, slot) = where(topk_index == j);
      results[token_index] += w[token_index, slot] * s_j B_j A_j dropout_j(tokens[token_index]),
      each expert drawing its OWN dropout on its gathered copy of the inputs (k T n dropout work in
      all, not T n) and accumulating by gather, add and index_put (`results[idx] += ...`);
    * the balance-loss statistics from bincount of the chosen experts: the loss
      E * sum_j (count_j / T) * mean_t p_j is evaluated by model.aux_loss() from layer.last_stats,
      the same formula, once per step as in the public code (no padding mask: the public layer has none);
    * result + the experts' sum.

    Expert j is rows j d:(j+1) d of lora_A and columns j d:(j+1) d of lora_B (slices, so gradients
    reach the same parameters as GOAT's); s_j is expert_scale[j]; the dropouts are
    `layer.public_dropouts` (set up by use_public_layer_forward).
    """
    _require_linear(layer)
    d, num_experts = layer.expert_rank, layer.num_experts

    def expert(j: int, inputs: torch.Tensor) -> torch.Tensor:  # GOATExpert: s_j * B_j(A_j(dropout_j(x)))
        A_j = layer.lora_A[j * d : (j + 1) * d]  # (d, n)
        B_j = layer.lora_B[:, j * d : (j + 1) * d]  # (m, d)
        hidden = nn.functional.linear(layer.public_dropouts[j](inputs), A_j)
        return nn.functional.linear(hidden, B_j) * layer.public_scales[j]

    result = layer.base_layer(x)
    tokens = x.to(layer.lora_A.dtype).reshape(-1, layer.in_features)  # (T, n)
    probs = torch.softmax(layer.router(tokens), dim=-1)  # (T, E)
    top_probs, topk_index = probs.topk(layer.top_k, dim=-1)  # (T, k)
    top_weights = top_probs / top_probs.sum(dim=-1, keepdim=True)

    results = torch.zeros_like(expert(0, tokens))  # the shape probe: expert 0 over all T tokens
    for j in range(num_experts):
        token_index, slot = torch.where(topk_index == j)
        results[token_index] += top_weights[token_index, slot, None] * expert(j, tokens[token_index])

    counts = torch.bincount(topk_index.reshape(-1), minlength=num_experts)  # (E,)
    if not in_backward_recompute():  # as GoatLayer._record: a checkpointing recompute records nothing
        layer.last_stats = F.RoutingStats(
            probs.sum(dim=0), counts.float(), torch.full((), float(tokens.shape[0]), device=tokens.device)
        )
    return result + results.reshape(*result.shape[:-1], layer.out_features).to(result.dtype)


class _Runner:
    """One method's model, optimizer and step / eval closures on a fixed batch."""

    def __init__(self, method: str, model: nn.Module, batch: dict, device: torch.device, backend: str = "inductor",
                 bf16: bool = False):  # fmt: skip
        self.method, self.model, self.batch, self.device = method, model.to(device), batch, device
        self.autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.aux_coef = model.goat_config.aux_loss_coef if hasattr(model, "goat_layers") else 0.0
        self.forward = model
        if method.endswith(COMPILED_SUFFIXES):  # GOAT in one graph; peft's LoRA as torch.compile takes it
            mode = "reduce-overhead" if method.endswith("_cudagraphs") else None
            self.forward = torch.compile(model, backend=backend, fullgraph=method.startswith("goat"), mode=mode)

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.forward(**self.batch).loss
            if self.aux_coef:
                loss = loss + self.aux_coef * self.model.aux_loss()  # GOAT's balance loss, as training adds it
        loss.backward()
        self.optimizer.step()

    def eval_step(self) -> None:
        self.model.eval()
        with torch.inference_mode(), self.autocast():
            inputs = {k: v for k, v in self.batch.items() if k != "labels"}
            self.forward(**inputs)

    def resident_bytes(self) -> int:
        """Parameters, buffers, optimizer state and quantized weights' statistics (what stays allocated
        between steps)."""
        from .quant import quant_state_tensors

        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [t for module in self.model.modules() for t in quant_state_tensors(module)]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        seen, total = set(), 0
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def peak_step_memory(runner: _Runner) -> int:
    """Peak bytes while one training step runs (see the module docstring for how)."""
    device = runner.device
    runner.train_step()  # make sure optimizer state exists
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.train_step()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device))
    from torch.profiler import ProfilerActivity, profile

    resident = runner.resident_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.train_step()
    # the allocator's own events, not the ops' net allocations: a compiled graph is one "op" whose
    # temporaries are allocated and freed inside it, which the ops' figures would net to nothing
    allocations = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(allocations, key=lambda e: e.start_ns()):
        current += event.nbytes()  # an allocation (> 0) or a free (< 0)
        peak = max(peak, current)
    return resident + peak


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": q[0], "p75": q[2], "min": ordered[0], "max": ordered[-1],
            "n": len(ordered)}


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """All methods on one model, interleaved round robin; returns the figures as a dict."""
    smoke = args.smoke
    steps, warmup = (min(args.steps, 2), 1) if smoke else (args.steps, args.warmup)
    batch_size, seq_len = (4, 16) if smoke else MODEL_SHAPES.get(name, (8, 128))
    batch_size, seq_len = args.batch_size or batch_size, args.seq_len or seq_len

    start = time.perf_counter()
    base = _load_model(name, args.seed)
    load_s = time.perf_counter() - start
    if base.config.problem_type is None:  # set by the first forward otherwise: a recompile of compiled methods
        base.config.problem_type = "single_label_classification"
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    batch = {
        "input_ids": torch.randint(3, vocab, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator),
    }
    batch = {k: v.to(device) for k, v in batch.items()}

    runners, setup_s, trainable = {}, {}, {}
    for method in args.methods:
        start = time.perf_counter()
        model = build_method(method, base, args)
        setup_s[method] = time.perf_counter() - start
        trainable[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        runners[method] = _Runner(method, model, batch, device, getattr(args, "compile_backend", "inductor"),
                                  bf16=getattr(args, "bf16", False))
    del base

    step_times = {m: [] for m in runners}
    eval_times = {m: [] for m in runners}
    first_step, first_eval = {}, {}  # the first call: a compiled method compiles there
    for repetition in range(warmup + steps):  # round robin: every method once per repetition
        for method, runner in runners.items():
            elapsed = _timed(runner.train_step, device)
            first_step.setdefault(method, elapsed)
            if repetition >= warmup:
                step_times[method].append(elapsed)
    if not args.no_eval:
        for repetition in range(warmup + steps):
            for method, runner in runners.items():
                elapsed = _timed(runner.eval_step, device)
                first_eval.setdefault(method, elapsed)
                if repetition >= warmup:
                    eval_times[method].append(elapsed)
    memory = {m: peak_step_memory(r) for m, r in runners.items()}

    tokens = batch_size * seq_len
    methods = {}
    for method in runners:
        entry = {
            "trainable_params": trainable[method],
            "setup_s": setup_s[method],
            "step_s": _stats(step_times[method]),
            "peak_memory_bytes": memory[method],
        }
        if eval_times[method]:
            entry["eval_s"] = _stats(eval_times[method])
            entry["eval_tokens_per_s"] = tokens / entry["eval_s"]["median"]
        if method.endswith(COMPILED_SUFFIXES):  # first call minus a steady one
            entry["compile_s"] = first_step[method] - entry["step_s"]["median"]
            if eval_times[method]:
                entry["eval_compile_s"] = first_eval[method] - entry["eval_s"]["median"]
        methods[method] = entry
    return {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "load_s": load_s,
        "memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
        "params+buffers+optimizer state + peak of the allocations (torch.profiler allocator events) during one step",
        "methods": methods,
        "ratios": _ratios(step_times, eval_times, memory, getattr(args, "quantize", None)),
        "quantize": getattr(args, "quantize", None),
        "bf16_autocast": bool(getattr(args, "bf16", False)),
    }


def _paired_ratio(numerator: list[float], denominator: list[float]) -> float | None:
    """Median over repetitions of numerator[i] / denominator[i] (both measured in the same round)."""
    if not numerator or not denominator:
        return None
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def _ratios(step_times: dict, eval_times: dict, memory: dict, quantize: str | None = None) -> dict:
    targets = QUANT_TARGETS if quantize else TARGETS
    ratios = {}
    if "goat" in step_times and "lora" in step_times:
        ratios["step"] = _paired_ratio(step_times["goat"], step_times["lora"])
        ratios["memory"] = memory["goat"] / memory["lora"]
        # throughput ratio GOAT / LoRA = LoRA time / GOAT time
        ratios["eval"] = _paired_ratio(eval_times["lora"], eval_times["goat"])
    if "goat" in step_times and "goat_public" in step_times:  # the loop target: the public layer
        ratios["loop_speedup"] = _paired_ratio(step_times["goat_public"], step_times["goat"])
    if "goat" in step_times and "goat_loop" in step_times:  # information only: no target
        ratios["lean_loop_speedup"] = _paired_ratio(step_times["goat_loop"], step_times["goat"])
    if "goat_compiled" in step_times and "lora_compiled" in step_times:  # compiled against compiled
        ratios["compiled_step"] = _paired_ratio(step_times["goat_compiled"], step_times["lora_compiled"])
        ratios["compiled_memory"] = memory["goat_compiled"] / memory["lora_compiled"]
        ratios["compiled_eval"] = _paired_ratio(eval_times["lora_compiled"], eval_times["goat_compiled"])
    if "goat_cudagraphs" in step_times and "lora_cudagraphs" in step_times:
        ratios["cudagraph_step"] = _paired_ratio(step_times["goat_cudagraphs"], step_times["lora_cudagraphs"])
        ratios["cudagraph_eval"] = _paired_ratio(eval_times["lora_cudagraphs"], eval_times["goat_cudagraphs"])
    if "goat_compiled" in step_times and "goat" in step_times:
        ratios["compile_speedup"] = _paired_ratio(step_times["goat"], step_times["goat_compiled"])
    if "lora_compiled" in step_times and "lora" in step_times:
        ratios["lora_compile_speedup"] = _paired_ratio(step_times["lora"], step_times["lora_compiled"])
    for method, key in (("goat_top_p", "top_p_step"), ("goat_shared", "shared_step"),
                        ("goat_runtime", "runtime_step")):  # routing variants; the run-time residual
        if "goat" in step_times and method in step_times:
            ratios[key] = _paired_ratio(step_times[method], step_times["goat"])
    if "goat_runtime" in memory and "lora" in memory:
        ratios["runtime_step_vs_lora"] = _paired_ratio(step_times["goat_runtime"], step_times["lora"])
        ratios["runtime_memory_vs_lora"] = memory["goat_runtime"] / memory["lora"]
    ratios["met"] = {
        key: (value <= targets[key][1] if targets[key][0] == "<=" else value >= targets[key][1])
        for key, value in ratios.items()
        if key in targets and value is not None
    }
    return ratios


# ------------------------------------------------------------------------------------------------
# printing
# ------------------------------------------------------------------------------------------------


def format_model_table(name: str, figures: dict) -> str:
    methods, ratios = figures["methods"], figures["ratios"]
    quantize = figures.get("quantize")
    targets = QUANT_TARGETS if quantize else TARGETS
    lora = methods.get("lora")
    lines = [
        f"model {name}{f' on a {quantize} base (lora = QLoRA)' if quantize else ''}: "
        f"batch {figures['batch_size']} x {figures['seq_len']} tokens"
        f"{', bfloat16 autocast' if figures.get('bf16_autocast') else ''}; step = forward + backward + AdamW; "
        f"median (p25-p75) of {next(iter(methods.values()))['step_s']['n']} interleaved repetitions",
        f"{'method':<12} {'trainable':>10} {'step ms':>22} {'x LoRA':>7} {'peak MiB':>9} {'x LoRA':>7} "
        f"{'eval tok/s':>11} {'x LoRA':>7}",
    ]
    for method, entry in methods.items():
        step = entry["step_s"]
        step_text = f"{1e3 * step['median']:.1f} ({1e3 * step['p25']:.1f}-{1e3 * step['p75']:.1f})"
        mem = entry["peak_memory_bytes"] / 2**20
        eval_tps = entry.get("eval_tokens_per_s")

        def rel(value, base_value):
            return f"{value / base_value:.2f}" if lora and base_value else "-"

        lines.append(
            f"{method:<12} {entry['trainable_params']:>10,d} {step_text:>22} "
            f"{rel(step['median'], lora['step_s']['median']) if lora else '-':>7} {mem:>9.1f} "
            f"{rel(entry['peak_memory_bytes'], lora['peak_memory_bytes']) if lora else '-':>7} "
            f"{(f'{eval_tps:,.0f}' if eval_tps else '-'):>11} "
            f"{rel(eval_tps, lora.get('eval_tokens_per_s')) if (lora and eval_tps) else '-':>7}"
        )
    labels = {
        "step": "GOAT step time / LoRA",
        "memory": "GOAT peak memory / LoRA",
        "eval": "GOAT eval throughput / LoRA",
        "loop_speedup": "public-layer loop reference step time / GOAT",
        "lean_loop_speedup": "lean loop reference step time / GOAT",
        "top_p_step": "GOAT top-p routing step time / top-k",
        "shared_step": "GOAT shared-expert routing step time / top-k",
        "runtime_step": "GOAT run-time residual step time / GOAT",
        "runtime_step_vs_lora": "GOAT run-time residual step time / LoRA",
        "runtime_memory_vs_lora": "GOAT run-time residual peak memory / LoRA",
        "compiled_step": "compiled GOAT step time / compiled LoRA",
        "compiled_memory": "compiled GOAT peak memory / compiled LoRA",
        "compiled_eval": "compiled GOAT eval throughput / compiled LoRA",
        "cudagraph_step": "CUDA-graph GOAT step time / CUDA-graph LoRA",
        "cudagraph_eval": "CUDA-graph GOAT eval throughput / CUDA-graph LoRA",
        "compile_speedup": "eager GOAT step time / compiled GOAT",
        "lora_compile_speedup": "eager LoRA step time / compiled LoRA",
    }
    for key, label in labels.items():
        if ratios.get(key) is None:
            continue
        if key not in targets:
            lines.append(f"  {label:<46} {ratios[key]:5.2f}x  (no target)")
            continue
        op, bound = targets[key]
        verdict = "met" if ratios["met"][key] else "MISSED"
        lines.append(f"  {label:<46} {ratios[key]:5.2f}x  (target {op} {bound:.2f}x)  {verdict}")
    for method, entry in methods.items():
        if "compile_s" in entry:
            lines.append(f"  {method}: compile time {entry['compile_s']:.1f} s (first step minus the median)"
                         + (f", eval {entry['eval_compile_s']:.1f} s" if "eval_compile_s" in entry else ""))
    return "\n".join(lines)


# ---- compute ops per step: the CPU proxy of the GPU's kernel count ---------------------------------
OPS_MODELS = ("tiny-llama", "minilm-arch")
OPS_TARGET = 1.4  # GOAT / LoRA ops per bf16 training step


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops dispatched inside it, views and detaches left out: each is one kernel launch on
    a GPU (a view launches none). On the GPU one eager step of the LLaMA-2-7B stack was 1,451 kernels for
    GOAT against 605 for LoRA (2.40x); this count on the CPU was 2.19x the day that was measured."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten.detach.default:
            name = func.overloadpacket.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_step_ops(name: str, args: argparse.Namespace) -> dict:
    """{method: {"train": ops, "eval": ops, "by_op": {...}}} for one bf16-autocast training step (forward,
    balance loss, backward, AdamW with foreach=True, the GPU's default: one multi-tensor kernel per
    update, not one per parameter) and one eval forward under inference_mode, after one warm-up step."""
    base = _load_model(name, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    vocab = base.config.vocab_size
    batch = {"input_ids": torch.randint(1, vocab, (4, 32), generator=generator),
             "attention_mask": torch.ones(4, 32, dtype=torch.long), "labels": torch.randint(0, 2, (4,), generator=generator)}  # fmt: skip
    figures = {}
    for method in ("lora", "goat"):
        runner = _Runner(method, build_method(method, base, args), batch, torch.device("cpu"), bf16=True)
        runner.optimizer = torch.optim.AdamW(runner.params, lr=1e-4, foreach=True)
        runner.train_step()  # the optimizer's state is created in the first step
        with _OpCounter() as train:
            runner.train_step()
        with _OpCounter() as evaluation:
            runner.eval_step()
        figures[method] = {"train": sum(train.counts.values()), "eval": sum(evaluation.counts.values()),
                           "by_op": dict(sorted(train.counts.items()))}  # fmt: skip
    figures["train_ratio"] = figures["goat"]["train"] / figures["lora"]["train"]
    figures["eval_ratio"] = figures["goat"]["eval"] / figures["lora"]["eval"]
    figures["met"] = figures["train_ratio"] <= OPS_TARGET
    return figures


def format_ops_table(figures: dict) -> str:
    lines = ["compute ops per step (views left out), bf16 autocast, batch 4 x 32, GOAT r=8 E=8 top-2 vs peft LoRA r=8",
             f"{'model':<14} {'LoRA train':>10} {'GOAT train':>10} {'x LoRA':>7} {'LoRA eval':>10} {'GOAT eval':>10} "
             f"{'x LoRA':>7}"]  # fmt: skip
    for name, f in figures.items():
        lines.append(f"{name:<14} {f['lora']['train']:>10} {f['goat']['train']:>10} {f['train_ratio']:>6.2f}x "
                     f"{f['lora']['eval']:>10} {f['goat']['eval']:>10} {f['eval_ratio']:>6.2f}x  "
                     f"train target <= {OPS_TARGET}x {'met' if f['met'] else 'MISSED'}")  # fmt: skip
    return "\n".join(lines)


def format_init_table(figures: dict) -> str:
    from .svd import TWO_STAGE_MIN_SIZE

    lines = [
        f"initialisation of one LLaMA-2-7B-shaped layer ({figures['shapes']}), r={figures['rank']} "
        f"E={figures['experts']} (d={figures['expert_rank']}), device {figures['device']}, "
        f"median of {figures['repeats']} run(s)",
        f"{'method':<34} {'seconds':>9} {'speed-up':>9}",
    ]
    exact = figures["exact_s"]["median"]
    for key, label in (("exact_s", "exact float32 SVD per matrix"), ("fast_s", f"this project ({figures['fast_method']})")):
        seconds = figures[key]["median"]
        lines.append(f"{label:<34} {seconds:>9.2f} {exact / seconds:>8.2f}x")
    verdict = "met" if figures["speedup"] >= INIT_TARGET else "MISSED"
    lines.append(f"  speed-up {figures['speedup']:.2f}x (target >= {INIT_TARGET:.1f}x)  {verdict}")
    q = figures["quality"]
    lines.append(
        f"  experts' subspaces vs a float64 SVD over {q['experts_compared']} experts: largest principal angle "
        f"{q['max_angle_deg']:.3g} deg (median {q['median_angle_deg']:.3g}) for this project, "
        f"{q['exact_max_angle_deg']:.3g} deg (median {q['exact_median_angle_deg']:.3g}) for the exact route; "
        f"relative error of s*B_j*A_j against the exact route max {q['max_rel_error']:.2e} "
        f"(median {q['median_rel_error']:.2e}); alignment |W_eff - W0|/|W0| max {q['max_alignment_error']:.1e}"
    )
    for name, layer in q["per_layer"].items():
        lines.append(
            f"    {name:<10} max angle {layer['max_angle_deg']:.3g} deg (exact route {layer['exact_max_angle_deg']:.3g}), "
            f"max rel. error {layer['max_rel_error']:.2e}"
        )
    m = figures["largest_matrix"]
    verdict = "met" if m["speedup"] >= INIT_TARGET else "MISSED"
    lines.append(f"largest matrix alone ({m['name']} {m['shape']}): exact {m['exact_s']['median']:.2f} s, this project "
                 f"{m['fast_s']['median']:.2f} s, speed-up {m['speedup']:.2f}x (target >= {INIT_TARGET:.1f}x)  {verdict}")  # fmt: skip
    if "floor_s" in m:
        steps = ("gram_product", "band_reduction", "band_eigenvalues", "sytrd")
        seconds = {step: m[f"{step}_s"]["median"] for step in steps}
        lines.append(f"  floor of the Gram route: Gram product {seconds['gram_product']:.2f} s + band reduction "
                     f"{seconds['band_reduction']:.2f} s + band eigenvalues {seconds['band_eigenvalues']:.2f} s = "
                     f"{m['floor_s']:.2f} s, {m['floor_share']:.0%} of the route; exact / floor = "
                     f"{m['floor_speedup']:.2f}x")  # fmt: skip
        lines.append(f"  one-stage route (LAPACK sytrd {seconds['sytrd']:.2f} s; the route below h = "
                     f"{TWO_STAGE_MIN_SIZE}): {m['one_stage_s']['median']:.2f} s, "
                     f"speed-up {m['one_stage_speedup']:.2f}x")  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# initialisation benchmark
# ------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """The adapted matrices of one decoder layer, as plain Linear layers (random weights)."""

    def __init__(self, shapes: tuple, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        for name, out_features, in_features in shapes:
            layer = nn.Linear(in_features, out_features, bias=False)
            with torch.no_grad():  # Kaiming-uniform like nn.Linear, but seeded and fast
                bound = 1.0 / math.sqrt(in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
            setattr(self, name, layer)


def _init_shapes(smoke: bool) -> tuple:
    if not smoke:
        return LLAMA7B_LAYER
    return tuple((name, max(16, out // 64), max(16, inp // 64)) for name, out, inp in LLAMA7B_LAYER)


def bench_init(args: argparse.Namespace, device: torch.device) -> dict:
    """Exact SVD per matrix against svd_method="auto", interleaved; then each expert's subspace."""
    from .config import GoatConfig
    from .inject import inject_goat_layers

    shapes = _init_shapes(args.smoke)
    repeats = 1 if args.smoke else max(1, args.init_repeats)
    block = _Block(shapes, args.seed).to(device)
    originals = {name: getattr(block, name).weight.detach().clone() for name, _, _ in shapes}
    targets = [name for name, _, _ in shapes]
    # "auto" picks the exact SVD for the tiny smoke shapes; force the Gram route there so it runs.
    fast = "gram" if args.smoke else "auto"
    times = {"exact": [], fast: []}
    layers = {}
    for _ in range(repeats):  # interleaved, so background load hits both alike
        for method in ("exact", fast):
            model = copy.deepcopy(block)
            config = GoatConfig(r=args.rank, num_experts=args.experts, top_k=args.top_k, svd_method=method)
            elapsed = _timed(lambda m=model, c=config, k=method: layers.__setitem__(k, inject_goat_layers(m, c, targets)), device)
            times[method].append(elapsed)
            del model
    from .svd import compute_device, resolve_method

    fast_method = f"{fast} -> {resolve_method(fast, originals[targets[0]])} on {compute_device(originals[targets[0]])}"
    quality = init_quality(layers["exact"], layers[fast], originals)
    del layers
    largest = max(targets, key=lambda name: originals[name].numel())
    largest_matrix = bench_init_matrix(largest, originals[largest], args, "gram" if args.smoke else "auto", repeats)
    exact_s, fast_s = _stats(times["exact"]), _stats(times[fast])
    return {
        "shapes": ", ".join(f"{n} {o}x{i}" for n, o, i in shapes),
        "rank": args.rank,
        "experts": args.experts,
        "expert_rank": args.rank // args.experts,
        "device": str(device),
        "repeats": repeats,
        "fast_method": fast_method,
        "exact_s": exact_s,
        "fast_s": fast_s,
        "speedup": exact_s["median"] / fast_s["median"],
        "target_speedup": INIT_TARGET,
        "met": exact_s["median"] / fast_s["median"] >= INIT_TARGET,
        "quality": quality,
        "largest_matrix": largest_matrix,
    }


def bench_init_matrix(name: str, weight: torch.Tensor, args: argparse.Namespace, method: str, repeats: int) -> dict:
    r"""One matrix alone: the exact SVD against `method`, and where the Gram route's floor lies.

    On the CPU the route for large h reduces the h x h Gram matrix G in two stages (svd.py): to a band
    matrix with blocked matrix-matrix products, then the band matrix's eigenvalues. Forming G and those
    two steps are timed apart, on the same matrix: whatever else the route does, it cannot beat the
    exact SVD by more than exact / (their sum). Beside them the one-stage route (LAPACK sytrd, the
    route for smaller h, half its flops in memory-bound matrix-vector products) and sytrd alone, the
    floor that route had."""
    from scipy.linalg import eig_banded

    from .functional import expert_component_indices
    from .svd import (band_reduce_, band_width, gram_block_triangle, gram_lower_column_major, gram_singular_components,
                      lapack_available, lower_band_storage, singular_components)  # fmt: skip

    rows, cols = weight.shape
    wide, bandwidth = rows < cols, band_width(min(rows, cols))
    indices = expert_component_indices("goat", min(rows, cols), args.experts, args.rank // args.experts).reshape(-1)
    steps = ("gram_product", "band_reduction", "band_eigenvalues", "one_stage", "sytrd")
    times: dict[str, list[float]] = {"exact": [], method: [], **{step: [] for step in steps}}
    device = weight.device
    floor_measurable = device.type == "cpu" and lapack_available()
    for _ in range(repeats):  # interleaved like the whole layer
        times["exact"].append(_timed(lambda: singular_components(weight, indices, "exact"), device))
        times[method].append(_timed(lambda: singular_components(weight, indices, method), device))
        if floor_measurable:  # the CPU only: no device to synchronise
            from scipy.linalg import lapack
            from threadpoolctl import threadpool_limits

            _timed_call(times["one_stage"], gram_singular_components, [weight.float()], indices[None], two_stage=False)
            with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
                lower = _timed_call(times["gram_product"], gram_block_triangle, weight.float(), wide, upper=False)
                _timed_call(times["band_reduction"], band_reduce_, lower, bandwidth)
                band = lower_band_storage(lower, bandwidth)
                _timed_call(times["band_eigenvalues"], eig_banded, band, lower=True, eigvals_only=True)
                gram = gram_lower_column_major(weight.float(), wide)
                _timed_call(times["sytrd"], lapack.ssytrd, gram, lower=1, overwrite_a=1)
            del lower, band, gram
    exact_s, fast_s = _stats(times["exact"]), _stats(times[method])
    figures = {"name": name, "shape": f"{rows}x{cols}", "exact_s": exact_s, "fast_s": fast_s,
               "speedup": exact_s["median"] / fast_s["median"]}  # fmt: skip
    if floor_measurable:
        floor = statistics.median(g + r + e for g, r, e in zip(*(times[k] for k in steps[:3])))
        figures.update({f"{step}_s": _stats(times[step]) for step in steps})
        figures.update(floor_s=floor, floor_share=floor / fast_s["median"], floor_speedup=exact_s["median"] / floor,
                       one_stage_speedup=exact_s["median"] / figures["one_stage_s"]["median"])  # fmt: skip
    return figures


def _timed_call(into: list[float], function, *args, **kwargs):
    """function(*args, **kwargs), its wall time appended to `into` (CPU work: nothing to synchronise)."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    into.append(time.perf_counter() - start)
    return result


def _largest_angle_deg(B: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest principal angle, in degrees, between the column spaces of B and `reference`."""
    Q, R = torch.linalg.qr(B.double())[0], torch.linalg.qr(reference.double())[0]
    cosines = torch.linalg.svdvals(Q.T @ R).clamp(max=1.0)
    return math.degrees(float(torch.arccos(cosines.min())))


def init_quality(exact_layers: dict, fast_layers: dict, originals: dict) -> dict:
    r"""Both routes judged against a float64 SVD of W0: per expert j, the largest principal angle
    between the column space of B_j and the float64 left singular vectors of expert j's components
    (the row spaces of A_j give the same figure up to rounding). A float32 SVD is no reference: on
    CUDA its default driver was 13 degrees off. Beside that, the relative error
    |s B_j A_j - s B_j^exact A_j^exact|_F / |s B_j^exact A_j^exact|_F of the fast route against the
    exact one (sign-free), and per layer the alignment error |(W0 - W_res) + c s sum_j B_j A_j - W0|_F / |W0|_F
    of the fast route's layer (k = E)."""
    from .functional import expert_component_indices

    angles, exact_angles, errors, alignment, per_layer = [], [], [], [], {}
    for name, fast in fast_layers.items():
        exact = exact_layers[name]
        d, E = fast.expert_rank, fast.num_experts
        W0 = originals[name].double()
        U64 = torch.linalg.svd(W0, full_matrices=False)[0]  # float64: the reference for both routes
        components = expert_component_indices("goat", min(W0.shape), E, d).to(U64.device)
        layer_angles, layer_exact_angles, layer_errors = [], [], []
        for j in range(E):
            cols = slice(j * d, (j + 1) * d)
            reference = U64[:, components[j]]
            Bf, Be = fast.init_B[:, cols].double(), exact.init_B[:, cols].double()
            Af, Ae = fast.init_A[cols].double(), exact.init_A[cols].double()
            layer_angles.append(_largest_angle_deg(Bf, reference))
            layer_exact_angles.append(_largest_angle_deg(Be, reference))
            scale_f, scale_e = float(fast.expert_scale[j]), float(exact.expert_scale[j])
            Pf, Pe = scale_f * Bf @ Af, scale_e * Be @ Ae
            layer_errors.append(float(torch.linalg.norm(Pf - Pe) / torch.linalg.norm(Pe).clamp_min(1e-300)))
        W_eff = base_weight(fast).double() + fast.residual().double()
        alignment.append(float(torch.linalg.norm(W_eff - W0) / torch.linalg.norm(W0)))
        angles += layer_angles
        exact_angles += layer_exact_angles
        errors += layer_errors
        per_layer[name] = {"max_angle_deg": max(layer_angles), "exact_max_angle_deg": max(layer_exact_angles),
                           "max_rel_error": max(layer_errors)}  # fmt: skip
    return {
        "experts_compared": len(angles),
        "reference": "float64 SVD",
        "max_angle_deg": max(angles),
        "median_angle_deg": statistics.median(angles),
        "exact_max_angle_deg": max(exact_angles),
        "exact_median_angle_deg": statistics.median(exact_angles),
        "max_rel_error": max(errors),
        "median_rel_error": statistics.median(errors),
        "max_alignment_error": max(alignment),
        "per_layer": per_layer,
    }


def base_weight(layer) -> torch.Tensor:
    from .layer import base_weight_2d

    return base_weight_2d(layer.base_layer).detach()


# ------------------------------------------------------------------------------------------------
# quantization error of the frozen base
# ------------------------------------------------------------------------------------------------

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
    from . import quant
    from .config import GoatConfig
    from .inject import all_initial_factors, layer_generator
    from .svd import batched_singular_components

    config = GoatConfig(r=args.rank, num_experts=args.experts, top_k=min(args.top_k, args.experts))
    modules = {name: _linear(weight) for name, weight in weights.items()}
    factors = all_initial_factors(modules, config, {n: layer_generator(config.seed, i) for i, n in enumerate(weights)})
    sums: dict[str, dict] = {}
    for name, W0 in weights.items():
        W0 = W0.float()
        W_res = F.residual_weight(factors[name], torch.tensor(config.residual_coefs))
        (U, S, V), = batched_singular_components([W0], torch.arange(args.rank)[None], "auto")
        P_r = (U * S) @ V.T  # top-r components: PiSSA's s B A
        entry = {"norm2": _norm2(W0), "goat_norm2": _norm2(W0 - W_res), "pissa_norm2": _norm2(W0 - P_r),
                 "residual_norm2": _norm2(W_res)}  # fmt: skip
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
    from .inject import find_target_modules
    from .config import GoatConfig

    if args.smoke:
        # 64 wide: bitsandbytes quantizes in blocks of 64 weights, and its 0.50 CPU dequantization garbles
        # rows narrower than a block on AVX512-BF16 CPUs (no real model's layers are that narrow)
        model = _tiny_model("tiny-llama", args.seed, width=64)
        source = "tiny random LLaMA (smoke)"
    else:
        from . import hf

        model = hf.load_causal_lm("smollm2", dtype=torch.float32)
        source = "SmolLM2-135M-Instruct (shipped GGUF, dequantised to float32)"
    names = find_target_modules(model, GoatConfig())
    weights = {name: model.get_submodule(name).weight.detach().float().to(device) for name in names}
    del model
    small = summarise_quant_errors(quant_error_sums(weights, args), lambda name: name.rsplit(".", 1)[-1])
    block = _Block(_init_shapes(args.smoke), args.seed)
    weights = {name: getattr(block, name).weight.detach().to(device) for name, _, _ in _init_shapes(args.smoke)}
    del block
    large = summarise_quant_errors(quant_error_sums(weights, args), lambda name: name)
    return {"rank": args.rank, "experts": args.experts, "models": {source: small,
            "one LLaMA-2-7B-shaped layer (random Kaiming-uniform weights)": large}}  # fmt: skip


def format_quant_error_table(figures: dict) -> str:
    lines = [
        f"relative quantization error |deq(Q(W)) - W|_F / |W|_F of the frozen base, r={figures['rank']} "
        f"E={figures['experts']}; QLoRA: W = W0; GOAT: W = W0 - W_res; QPiSSA: W = W0 - top-r components; "
        f"unload: |deq(Q(W0 - W_res)) - W0| / |W0|; re-quantize: moving an already quantized base by W_res",
    ]
    for source, rows in figures["models"].items():
        lines.append(f"{source}")
        lines.append(f"  {'layer':<10} {'|W_res|/|W0|':>12} {'kind':>5} {'QLoRA':>8} {'GOAT':>8} {'GOAT/QLoRA':>10} "
                     f"{'QPiSSA':>8} {'unload':>8} {'requant':>8}")  # fmt: skip
        for name, row in rows.items():
            for kind in QUANT_KINDS:
                first = kind == QUANT_KINDS[0]
                e, residual = row[kind], f"{row['residual_rel']:.5f}" if first else ""
                lines.append(
                    f"  {name if first else '':<10} {residual:>12} {kind:>5} {e['qlora']:>8.5f} {e['goat']:>8.5f} "
                    f"{e['goat_over_qlora']:>10.5f} {e['pissa']:>8.5f} {e['goat_unload']:>8.5f} {e['requantize']:>8.5f}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="goat bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
