"""The step benchmark: training step, peak memory and eval throughput of each method on one model, in
one round robin, and the ratios against LoRA."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .common import (
    COMPILED_SUFFIXES,
    MODEL_SHAPES,
    QUANT_TARGETS,
    TARGETS,
    Runner,
    build_method,
    cudagraph_skips,
    load_model,
    random_batch,
    sync_device,
    timed,
    timing_stats,
)


def peak_step_memory(runner: Runner) -> int:
    """Peak bytes while one training step runs (see the module docstring for how)."""
    device = runner.device
    runner.train_step()  # make sure optimizer state exists
    if device.type == "cuda":
        sync_device(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.train_step()
        sync_device(device)
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


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """All methods on one model, interleaved round robin; returns the figures as a dict."""
    smoke = args.smoke
    steps, warmup = (min(args.steps, 2), 1) if smoke else (args.steps, args.warmup)
    batch_size, seq_len = (4, 16) if smoke else MODEL_SHAPES.get(name, (8, 128))
    batch_size, seq_len = args.batch_size or batch_size, args.seq_len or seq_len

    start = time.perf_counter()
    base = load_model(name, args.seed)
    load_s = time.perf_counter() - start
    batch = {k: v.to(device) for k, v in random_batch(base, batch_size, seq_len, args.seed).items()}

    runners, setup_s, trainable = {}, {}, {}
    for method in args.methods:
        start = time.perf_counter()
        model = build_method(method, base, args)
        setup_s[method] = time.perf_counter() - start
        trainable[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        runners[method] = Runner(
            method,
            model,
            batch,
            device,
            getattr(args, "compile_backend", "inductor"),
            bf16=getattr(args, "bf16", False),
        )
    del base

    step_times = {m: [] for m in runners}
    eval_times = {m: [] for m in runners}
    skips = dict.fromkeys(runners, 0)  # compiled graphs each method ran without CUDA graphs

    def timed_call(method: str, fn) -> float:
        before = cudagraph_skips()
        elapsed = timed(fn, device)
        skips[method] += cudagraph_skips() - before
        return elapsed

    first_step, first_eval = {}, {}  # the first call: a compiled method compiles there
    for repetition in range(warmup + steps):  # round robin: every method once per repetition
        for method, runner in runners.items():
            elapsed = timed_call(method, runner.train_step)
            first_step.setdefault(method, elapsed)
            if repetition >= warmup:
                step_times[method].append(elapsed)
    if not args.no_eval:
        for repetition in range(warmup + steps):
            for method, runner in runners.items():
                elapsed = timed_call(method, runner.eval_step)
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
            "step_s": timing_stats(step_times[method]),
            "peak_memory_bytes": memory[method],
        }
        if eval_times[method]:
            entry["eval_s"] = timing_stats(eval_times[method])
            entry["eval_tokens_per_s"] = tokens / entry["eval_s"]["median"]
        if method.endswith(COMPILED_SUFFIXES):  # first call minus a steady one
            entry["compile_s"] = first_step[method] - entry["step_s"]["median"]
            if eval_times[method]:
                entry["eval_compile_s"] = first_eval[method] - entry["eval_s"]["median"]
        if method.endswith("_cudagraphs") and device.type == "cuda":  # elsewhere there are no CUDA graphs to skip
            entry["cudagraph_skips"] = skips[method]
        methods[method] = entry
    return {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "load_s": load_s,
        "memory_method": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "params+buffers+optimizer state + peak of the allocations (torch.profiler allocator events) in one step",
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
    for method, key in (
        ("goat_top_p", "top_p_step"),
        ("goat_shared", "shared_step"),
        ("goat_runtime", "runtime_step"),
    ):  # routing variants; the run-time residual
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
            lines.append(
                f"  {method}: compile time {entry['compile_s']:.1f} s (first step minus the median)"
                + (f", eval {entry['eval_compile_s']:.1f} s" if "eval_compile_s" in entry else "")
            )
        if entry.get("cudagraph_skips"):
            lines.append(
                f"  {method}: {entry['cudagraph_skips']} compiled graph(s) ran without CUDA graphs (inductor's log "
                "says why): they ran the default mode's code, so its figures are not a CUDA graph's"
            )
    return "\n".join(lines)
