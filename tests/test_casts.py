"""A GOAT model cast whole, as DeepSpeed's bf16 engine does (`module.bfloat16()` / `.half()`): the
float64 expert-load counts keep counting exact integers, the float32 initial factors and scales that
rebuild W_res are untouched, and unload() still returns the original weights within the cast's rounding."""

from __future__ import annotations

import pytest
import torch

from goat_lora import GoatConfig, get_goat_model
from goat_lora.testing import tiny_llama, token_batch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_whole_module_cast_keeps_the_bookkeeping_precision(dtype):
    original = {name: p.detach().clone() for name, p in tiny_llama().named_parameters()}
    model = get_goat_model(tiny_llama(), GoatConfig(r=4, num_experts=2, top_k=1, dropout=0.0))
    layers = list(model.goat_layers())
    factors = [(layer.init_A.clone(), layer.init_B.clone(), layer.expert_scale.clone()) for layer in layers]
    (model.bfloat16() if dtype is torch.bfloat16 else model.half())
    for layer, (A, B, scale) in zip(layers, factors):
        assert layer.lora_A.dtype == dtype and layer.base_layer.weight.dtype == dtype  # the cast happened
        assert layer.load_counts.dtype == torch.float64
        assert torch.equal(layer.init_A, A) and torch.equal(layer.init_B, B) and torch.equal(layer.expert_scale, scale)
    # counts beyond what bf16 / fp16 hold exactly (2^11 + 1 = 2049 rounds to 2048 in both)
    layers[0].load_counts.fill_(2048.0)
    layers[0].load_counts += 1.0
    assert float(layers[0].load_counts[0]) == 2049.0
    with torch.no_grad():
        model(**token_batch())  # still runs, routing counted
    base = model.unload()
    unit = torch.finfo(dtype).eps  # one rounding of the cast, another when W_res is added back
    for name, weight in base.named_parameters():
        ref = original[name]
        assert torch.all((weight.float() - ref).abs() <= 2 * unit * (ref.abs() + 1e-3)), name


def test_moving_the_model_keeps_the_bookkeeping_on_the_same_device_as_the_layer():
    model = get_goat_model(tiny_llama(), GoatConfig(r=4, num_experts=2, top_k=1))
    model.to(torch.device("cpu"), dtype=torch.bfloat16)
    for layer in model.goat_layers():
        assert layer.init_A.device == layer.lora_A.device and layer.init_A.dtype == torch.float32
