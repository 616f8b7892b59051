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

  With --compile-time: how long compiling takes, GOAT against LoRA, the whole model and regionally (as
  `goat train --compile` compiles), each compile in a fresh process with empty caches
  (goat_lora.bench.compile_time; target GOAT / LoRA <= 1.3x).

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
import datetime
import json
import os
import platform
import sys

import torch

from .common import (  # noqa: F401  (the names the tests and scripts use)
    ARCHITECTURES,
    COMPILE_METHODS,
    COMPILE_STYLES,
    LLAMA7B_LAYER,
    METHODS,
    MODEL_SHAPES,
    QUANT_METHODS,
    ROUTING_METHODS,
    Runner,
    architecture_config,
    build_method,
    cudagraph_skips,
    load_model,
    random_batch,
)
from .init import bench_init, format_init_table
from .ops import OPS_MODELS, count_step_ops, format_ops_table
from .public_layer import use_public_layer_forward  # noqa: F401
from .quant_error import bench_quant_error, format_quant_error_table
from .steps import bench_model, format_model_table


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
        "--compile-time",
        action="store_true",
        help="time compiling instead: lora and goat compiled whole and regionally, each compile in a fresh process "
        "with empty caches, in --compile-rounds alternating rounds (target: GOAT / LoRA <= 1.3x)",
    )
    parser.add_argument(
        "--compile-rounds", type=int, default=3, help="rounds of --compile-time (default 3; 1 with --smoke)"
    )
    parser.add_argument(
        "--compile-styles",
        nargs="+",
        default=list(COMPILE_STYLES),
        choices=COMPILE_STYLES,
        help="what --compile-time compiles: the whole model (torch.compile) and/or its repeated blocks "
        "(accelerate's compile_regions, as goat train --compile); default both",
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
    elif args.compile_time:
        from .compile_time import bench_compile_time, format_compile_time_table

        models = ["tiny-bert"] if args.smoke else args.models
        result = {"meta": meta, "compile_time": bench_compile_time(args, models)}
        print(format_compile_time_table(result["compile_time"]))
    elif args.ops:
        result = {"meta": meta, "ops": {name: count_step_ops(name, args) for name in OPS_MODELS}}
        print(format_ops_table(result["ops"]))
    else:
        if args.compile and args.methods == list(METHODS):  # the default set: --compile has its own
            args.methods = list(COMPILE_METHODS)
        tiny = [m for m in args.models if m.startswith("tiny-")]  # --smoke may name one of its two models
        models = {}
        for name in (tiny or ["tiny-bert", "tiny-llama"]) if args.smoke else args.models:
            models[name] = bench_model(name, args, device)
            print(format_model_table(name, models[name]))
            print(flush=True)
        result = {"meta": meta, "models": models}
    if args.json:
        from ..files import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"figures written to {args.json}")
    return 0


def _check_methods(args: argparse.Namespace) -> None:
    """With --quantize the default methods become QUANT_METHODS; refuse what does not fit (one line each)."""
    quantize = getattr(args, "quantize", None)
    if quantize and args.methods == list(METHODS):
        args.methods = list(QUANT_METHODS)
    if quantize:
        from .. import quant

        try:
            quant.bitsandbytes()
        except ImportError:
            raise SystemExit(
                f"goat bench: error: --quantize {quantize} needs bitsandbytes: {quant.INSTALL_HINT}"
            ) from None
        other = [m for m in args.methods if m not in QUANT_METHODS + ("head",)]
        if other:
            raise SystemExit(
                f"goat bench: error: --quantize runs {', '.join(QUANT_METHODS)} and head; not {', '.join(other)}"
            )
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
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
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
        "compile_backend": args.compile_backend
        if getattr(args, "compile", False) or getattr(args, "compile_time", False)
        else None,
        "bf16_autocast": bool(getattr(args, "bf16", False)),
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="goat bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))
