"""What every benchmark shares: the methods and models it names, how each method is built on a copy of
one base, the runner that trains and evaluates it on a fixed batch, and timing helpers."""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .public_layer import use_public_layer_forward

METHODS = ("head", "lora", "goat", "goat_loop", "goat_public")  # the default set
# --compile: eager, torch.compile's default mode, and its reduce-overhead mode (CUDA graphs on CUDA; on the CPU
# the same code as the default mode, as there are no CUDA graphs), all in one round robin
COMPILE_METHODS = ("lora", "goat", "lora_compiled", "goat_compiled", "lora_cudagraphs", "goat_cudagraphs")
COMPILED_SUFFIXES = ("_compiled", "_cudagraphs")
COMPILE_STYLES = ("whole", "regional")  # --compile-time: torch.compile(model), accelerate's compile_regions(model)
ROUTING_METHODS = ("goat_top_p", "goat_shared")  # GOAT's routing variants, on request
QUANT_METHODS = ("lora", "goat", "goat_runtime")  # the default set with --quantize (head on request)
MODEL_SHAPES = {  # batch x tokens; "-arch": the same architecture with random weights
    "minilm": (32, 64),
    "smollm2": (8, 128),
    "minilm-arch": (32, 64),
    "smollm2-arch": (8, 128),
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
COMPILE_TIME_TARGET = 1.3  # --compile-time: GOAT's compile time / LoRA's
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


def tiny_model(name: str, seed: int, width: int = 32) -> nn.Module:
    """A seeded random sequence classifier (2 layers, 2 heads, vocabulary 128, 2 labels), `width` wide, in
    train mode (for --smoke and the test suite)."""
    from ..testing import tiny_bert, tiny_llama_classifier

    if name == "tiny-bert":
        return tiny_bert(seed, width, vocab_size=128, num_attention_heads=2, num_labels=2).train()
    return tiny_llama_classifier(seed, width, vocab_size=128, num_attention_heads=2, num_key_value_heads=1).train()


def architecture_config(name: str):
    """The transformers config of a random-weight benchmark model (ARCHITECTURES): MiniLM's or
    SmolLM2-135M's exact architecture (the same step cost without the weights, for machines where the
    model packages are not installed, such as a GPU box), or LLaMA-2-7B's shapes with 2 decoder layers."""
    from transformers import BertConfig, LlamaConfig

    if name == "minilm-arch":  # all-MiniLM-L6-v2
        return BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            max_position_embeddings=512,
            num_labels=2,
        )
    if name == "smollm2-arch":  # SmolLM2-135M
        return LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_theta=100000.0,
            num_labels=2,
            pad_token_id=2,
        )
    if name == "llama2-7b-2layers":  # meta-llama/Llama-2-7b-hf's layer shapes, 2 of its 32 layers
        return LlamaConfig(
            vocab_size=32000,
            hidden_size=4096,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=11008,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            num_labels=2,
            pad_token_id=0,
        )
    raise ValueError(f"unknown benchmark architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")


def _architecture_model(name: str, seed: int) -> nn.Module:
    """A sequence classifier with the architecture `name` and random weights."""
    from transformers import BertForSequenceClassification, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = architecture_config(name)
    model_class = BertForSequenceClassification if config.model_type == "bert" else LlamaForSequenceClassification
    return model_class(config)


def load_model(name: str, seed: int) -> nn.Module:
    """The benchmark model `name` (a two-label sequence classifier), ready for training steps: without a KV cache,
    as transformers' Trainer trains (TrainingArguments.use_cache is False; left on, a decoder fills one in every
    step, and compiled regionally each block's cache slot is a guard that recompiles the block once per layer,
    docs/benchmarks.md), and with its problem type set (the first forward would set it, a recompile of
    compiled methods)."""
    if name.startswith("tiny-"):
        model = tiny_model(name, seed)
    elif name in ARCHITECTURES:
        model = _architecture_model(name, seed)
    else:
        from .. import hf

        model = hf.load_sequence_classifier(name, 2, dtype=torch.float32)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if model.config.problem_type is None:
        model.config.problem_type = "single_label_classification"
    return model


def random_batch(model: nn.Module, batch_size: int, seq_len: int, seed: int) -> dict:
    """A seeded batch of random token ids (above the special ids 0-2), no padding, and binary labels."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, model.config.vocab_size, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator),
    }


def _head_names(model: nn.Module) -> list[str]:
    from ..hf import default_modules_to_save

    heads = default_modules_to_save(model)
    if not heads:
        raise ValueError(f"{type(model).__name__} has no 'classifier' or 'score' head to train")
    return heads


def build_method(method: str, base: nn.Module, args: argparse.Namespace) -> nn.Module:
    """A fresh copy of `base` adapted by `method`, with only that method's parameters trainable. With
    --quantize every base but goat's (which quantizes W0 - W_res itself) is quantized first; a "_compiled"
    method is built as its eager twin (Runner compiles it)."""
    for suffix in COMPILED_SUFFIXES:
        method = method.removesuffix(suffix)
    model = copy.deepcopy(base)
    heads = _head_names(model)
    quantize = getattr(args, "quantize", None)
    if quantize and method != "goat":
        from .. import quant
        from ..config import GoatConfig
        from ..inject import find_target_modules

        targets = find_target_modules(model, GoatConfig(modules_to_save=heads))  # every Linear but the head
        quant.quantize_modules(model, targets, quant.QuantSpec(quantize))
    if method == "head":
        for name, param in model.named_parameters():
            param.requires_grad_(any(name == h or name.startswith(h + ".") for h in heads))
        return model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.05,
            target_modules="all-linear",
            modules_to_save=heads,
        )
        return get_peft_model(model, config)
    from ..config import GoatConfig
    from ..model import get_goat_model

    routing = {"goat_top_p": "top_p", "goat_shared": "shared"}.get(method, "top_k")
    config = GoatConfig(
        r=args.rank,
        num_experts=args.experts,
        top_k=args.top_k,
        modules_to_save=heads,
        seed=args.seed,
        routing=routing,
        top_p=args.top_p,
        quantize=quantize if method == "goat" else None,
    )
    goat = get_goat_model(model, config)
    if method == "goat_loop":
        for layer in goat.goat_layers():
            layer.forward = layer.forward_loop_reference  # the per-expert Python loop
    elif method == "goat_public":
        for layer in goat.goat_layers():
            use_public_layer_forward(layer)
    return goat


class Runner:
    """One method's model, optimizer and step / eval closures on a fixed batch."""

    def __init__(
        self,
        method: str,
        model: nn.Module,
        batch: dict,
        device: torch.device,
        backend: str = "inductor",
        bf16: bool = False,
    ):
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
        from ..quant import quant_state_tensors

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


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cudagraph_skips() -> int:
    """How many compiled graphs inductor has run without CUDA graphs so far in this process (each skip is a graph
    that mode="reduce-overhead" ran as the default mode: inductor's log says why, e.g. an input it mutates)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync_device(device)
    start = time.perf_counter()
    fn()
    sync_device(device)
    return time.perf_counter() - start


def timing_stats(values: list[float]) -> dict:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "median": statistics.median(ordered),
        "p25": q[0],
        "p75": q[2],
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }
