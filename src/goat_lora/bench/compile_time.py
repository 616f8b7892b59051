"""The compile-time benchmark (`goat bench --compile-time`): how long torch.compile takes to make GOAT's
training step against peft LoRA's, compiling the whole model and regionally.

    whole     torch.compile(model): GOAT with fullgraph=True, as `goat bench --compile` compiles it
    regional  accelerate's compile_regions(model): each repeated block compiled once and its code reused
              by the others, the rest apart; what `goat train --compile` does outside CUDA graphs

Every compile runs in a fresh process with an empty inductor cache directory and the FX-graph and
AOTAutograd caches off: in one process the second method would reuse the kernels of the base model
that the first one compiled, which flatters whichever goes second. Compile time is the first training
step minus the median of the next three. Rounds alternate which method goes first; the ratio is the
median over rounds of GOAT / LoRA within a round (measured minutes apart, so the load of the machine
hits both alike)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from .common import COMPILE_TIME_TARGET

STEADY_STEPS = 3  # steps after the first one; their median is the step without compiling
# the options of `goat bench` a worker needs to build the same method (passed on by name)
_WORKER_OPTIONS = ("rank", "experts", "top_k", "top_p", "seed", "batch_size", "seq_len", "threads", "compile_backend")


def compile_once(model_name: str, method: str, style: str, options: dict) -> dict:
    """In this process: build `method` (lora or goat) on `model_name`, compile it in `style` and time its
    first training steps. {"first_s", "steady_s", "compile_s"}."""
    from accelerate.utils import compile_regions

    from . import add_bench_arguments
    from .common import MODEL_SHAPES, Runner, build_method, load_model, random_batch

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args([])
    vars(args).update(options)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model(model_name, args.seed)
    batch_size, seq_len = (4, 16) if model_name.startswith("tiny-") else MODEL_SHAPES.get(model_name, (8, 128))
    batch_size, seq_len = args.batch_size or batch_size, args.seq_len or seq_len
    model = build_method(method, base, args)
    runner = Runner(method, model, random_batch(base, batch_size, seq_len, args.seed), torch.device("cpu"))
    backend = args.compile_backend
    if style == "whole":
        runner.forward = torch.compile(model, backend=backend, fullgraph=method == "goat")
    else:  # the shallow copies compile_regions returns share the adapted layers with `model`
        runner.forward = compile_regions(model, backend=backend)
    times = []
    for _ in range(1 + STEADY_STEPS):
        start = time.perf_counter()
        runner.train_step()
        times.append(time.perf_counter() - start)
    steady = statistics.median(times[1:])
    return {"first_s": times[0], "steady_s": steady, "compile_s": times[0] - steady}


def _spawn(model_name: str, method: str, style: str, options: dict) -> dict:
    """compile_once in a fresh Python process with empty compiler caches; its figures."""
    with tempfile.TemporaryDirectory(prefix="goat-compile-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        env.update(TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
        spec = json.dumps({"model": model_name, "method": method, "style": style, "options": options})
        done = subprocess.run(
            [sys.executable, "-m", "goat_lora.bench.compile_time", spec], env=env, capture_output=True, text=True
        )
    last = (done.stdout.strip().splitlines() or ["{}"])[-1]
    figures = json.loads(last) if last.startswith("{") else {}
    if done.returncode != 0 or "compile_s" not in figures:
        why = figures.get("error") or ((done.stderr.strip().splitlines() or ["(no output)"])[-1])
        raise RuntimeError(f"compiling {method} ({style}) on {model_name} failed: {why}")
    return figures


def bench_compile_time(args: argparse.Namespace, models: list[str]) -> dict:
    """For each model: rounds of lora and goat compiled in each style, one fresh process per compile.
    {model: {"runs": [...], "compile_s": {style: {method: median}}, "ratios": {style: GOAT / LoRA},
    "met": {style: bool}}}."""
    options = {name: getattr(args, name) for name in _WORKER_OPTIONS}
    styles = args.compile_styles
    rounds = 1 if args.smoke else args.compile_rounds
    result = {}
    for model_name in models:
        runs = []
        for round_index in range(rounds):
            order = ("lora", "goat") if round_index % 2 == 0 else ("goat", "lora")
            for style in styles:
                for method in order:
                    figures = _spawn(model_name, method, style, options)
                    runs.append({"round": round_index, "style": style, "method": method, **figures})
                    print(
                        f"  {model_name} {style:<8} {method:<4} round {round_index}: "
                        f"compile {figures['compile_s']:.1f} s (first step {figures['first_s']:.1f} s, "
                        f"then {figures['steady_s']:.2f} s)",
                        flush=True,
                    )
        result[model_name] = _summarize(runs, styles)
    return result


def _summarize(runs: list[dict], styles: list[str]) -> dict:
    def times(style: str, method: str) -> list[float]:
        return [run["compile_s"] for run in runs if run["style"] == style and run["method"] == method]

    medians, ratios = {}, {}
    for style in styles:
        lora, goat = times(style, "lora"), times(style, "goat")
        medians[style] = {"lora": statistics.median(lora), "goat": statistics.median(goat)}
        ratios[style] = statistics.median(g / l for g, l in zip(goat, lora))  # paired by round
    return {
        "runs": runs,
        "compile_s": medians,
        "ratios": ratios,
        "met": {style: ratio <= COMPILE_TIME_TARGET for style, ratio in ratios.items()},
    }


def format_compile_time_table(result: dict) -> str:
    lines = [
        "compile time (first training step minus the median of the next three; each compile in a fresh process "
        "with empty caches; median over rounds)",
        f"{'model':<14} {'compile':<9} {'LoRA s':>8} {'GOAT s':>8} {'GOAT / LoRA':>12}  per round (GOAT / LoRA)",
    ]
    for model_name, figures in result.items():
        for style, ratio in figures["ratios"].items():
            runs = figures["runs"]
            per_round = []
            for round_index in sorted({run["round"] for run in runs}):
                pair = {r["method"]: r["compile_s"] for r in runs if r["round"] == round_index and r["style"] == style}
                per_round.append(f"{pair['goat']:.1f} / {pair['lora']:.1f}")
            verdict = "met" if figures["met"][style] else "MISSED"
            lines.append(
                f"{model_name:<14} {style:<9} {figures['compile_s'][style]['lora']:>8.1f} "
                f"{figures['compile_s'][style]['goat']:>8.1f} {ratio:>11.2f}x  {', '.join(per_round)}  "
                f"(target <= {COMPILE_TIME_TARGET:.2f}x: {verdict})"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # a worker: one compile, its figures (or its error) as the last line of stdout
    spec = json.loads(sys.argv[1])
    try:
        figures = compile_once(spec["model"], spec["method"], spec["style"], spec["options"])
    except Exception as error:  # reported by the parent in one line
        print(json.dumps({"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}))
        sys.exit(1)
    print(json.dumps(figures))
