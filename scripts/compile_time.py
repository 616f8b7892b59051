"""Compile time of one method on MiniLM, in its own process: whole model (torch.compile, GOAT with fullgraph=True,
as `goat bench --compile` does) or regional (each block of the longest repeated nn.ModuleList compiled with
Module.compile).
Usage: python scripts/compile_time.py lora:whole goat:regional ...; run each method in a fresh process with a fresh
TORCHINDUCTOR_CACHE_DIR (and TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0) so that no method reuses
kernels another compiled. Prints the first training step, the median of the next three, and their difference."""

import argparse
import sys
import time

import torch
from torch import nn

from goat_lora import bench
from goat_lora.bench.common import Runner, build_method, load_model


def repeated_blocks(model):
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    return best


p = argparse.ArgumentParser()
bench.add_bench_arguments(p)
args = p.parse_args([])
base = load_model("minilm", 0)
base.config.problem_type = "single_label_classification"
g = torch.Generator().manual_seed(0)
batch = {
    "input_ids": torch.randint(3, base.config.vocab_size, (32, 64), generator=g),
    "attention_mask": torch.ones(32, 64, dtype=torch.long),
    "labels": torch.randint(0, 2, (32,), generator=g),
}
for method in sys.argv[1:]:
    name, how = method.split(":")
    model = build_method(name, base, args)
    r = Runner(name, model, batch, torch.device("cpu"))
    torch._dynamo.reset()
    if how == "regional":
        blocks = repeated_blocks(model)
        for block in blocks:
            block.compile(fullgraph=name == "goat")
    elif how == "whole":
        r.forward = torch.compile(model, fullgraph=name == "goat")
    times = []
    for i in range(4):
        t = time.perf_counter()
        r.train_step()
        times.append(time.perf_counter() - t)
    steady = sorted(times[1:])[1]
    blocks = type(repeated_blocks(model)[0]).__name__ if how == "regional" else "-"
    print(
        f"{method:<16} first {times[0]:.1f} s  steady {steady:.2f} s  compile {times[0] - steady:.1f} s  "
        f"blocks {blocks}",
        flush=True,
    )
