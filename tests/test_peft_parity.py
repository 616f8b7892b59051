"""Cross-check against the ecosystem's reference: GOAT with one expert
(E = k = 1), init "principal", s = lora_alpha / d = 1, rho = 1, init_cof = 1 and no dropout is PiSSA.

peft's PiSSA (peft/tuners/lora/layer.py, `pissa_init`): W = U S V^T (torch.linalg.svd, float32),
lora_A = diag(sqrt(S_r / scaling)) V_r^T, lora_B = U_r diag(sqrt(S_r / scaling)), base <- W - scaling
* lora_B lora_A, with scaling = lora_alpha / r. With lora_alpha = r: scaling = 1, and GOAT gives
B = U_r sqrt(S_r) / sqrt(s rho), A = sqrt(S_r) V_r^T / sqrt(s rho), W_res = c s B A with s = rho = c = 1.
"""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is needed for the PiSSA cross-check")

from conftest import model_output

from goat_lora import GoatConfig, get_goat_model
from goat_lora.layer import base_weight_2d
from goat_lora.testing import tiny_gpt2, tiny_llama, tiny_mlp, token_batch

CASES = {
    "llama-linear": (tiny_llama, ["q_proj", "v_proj", "down_proj"], False, lambda: token_batch()),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_fc"], True, lambda: token_batch()),
    "mlp": (
        tiny_mlp,
        ["fc1", "fc2"],
        False,
        lambda: {"x": torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("r", [4, 8])
def test_single_expert_principal_equals_peft_pissa(case, r):
    factory, targets, fan_in_fan_out, inputs_fn = CASES[case]
    inputs = inputs_fn()
    base = factory()
    pissa = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=r,
            lora_alpha=r,
            lora_dropout=0.0,
            init_lora_weights="pissa",
            target_modules=targets,
            fan_in_fan_out=fan_in_fan_out,
        ),
    )
    goat = get_goat_model(
        copy.deepcopy(base),
        GoatConfig(
            r=r,
            num_experts=1,
            top_k=1,
            init="principal",
            scaling="alpha",
            lora_alpha=r,
            rho=1.0,
            init_cof=1.0,
            dropout=0.0,
            target_modules=targets,
            svd_method="exact",
        ),
    )
    layers = dict(goat.named_goat_layers())
    assert layers and all(float(layer.expert_scale[0]) == 1.0 for layer in layers.values())

    # the same residual base weights
    for name, layer in layers.items():
        peft_layer = pissa.base_model.model.get_submodule(name)
        torch.testing.assert_close(
            base_weight_2d(layer.base_layer), base_weight_2d(peft_layer.base_layer), atol=1e-5, rtol=1e-4
        )

    # the same outputs and gradients, after moving B off its init so that every path matters
    perturb = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, layer in layers.items():
            delta_B = 0.1 * torch.randn(layer.lora_B.shape, generator=perturb)
            layer.lora_B.add_(delta_B)
            pissa.base_model.model.get_submodule(name).lora_B["default"].weight.add_(delta_B)
    out_goat, out_pissa = model_output(goat, inputs), model_output(pissa, inputs)
    assert float((out_goat - out_pissa).detach().abs().max()) <= 1e-4
    weights = torch.linspace(-1, 1, out_goat.numel()).reshape(out_goat.shape)
    (out_goat * weights).sum().backward()
    (out_pissa * weights).sum().backward()
    for name, layer in layers.items():
        peft_layer = pissa.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, atol=1e-4, rtol=1e-4)
        assert float(layer.router.weight.grad.abs().max()) == 0.0  # one expert: softmax is constant 1
