"""The methods peft implements, prepared through peft (not re-written): LoRA, rsLoRA, DoRA, PiSSA; and
MiLoRA (peft's LoRA started from the minor singular components, which peft lacks). peft's PiSSA refuses
convolutions, so on the image model's 1x1 convolutions PiSSA is started here by peft's formula.
The singular components come from svd.py, as GOAT's do."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .. import quant
from ..svd import singular_components


def get_peft_baseline(method: str, model: nn.Module, settings, targets: list[str], head: list[str]):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=head or None,
        use_rslora=method == "rslora",
        use_dora=method == "dora",
        init_lora_weights="pissa" if method == "pissa" and not _has_convolutions(model, targets) else True,
    )
    spec = None if settings.quantize is None else quant.QuantSpec(settings.quantize)
    if spec is not None and method != "pissa":  # QLoRA: peft adapts the quantized layers (its bitsandbytes LoRA)
        quant.quantize_modules(model, targets, spec)
    torch.manual_seed(settings.seed)  # peft draws lora_A from the global generator
    peft_model = get_peft_model(model, config)
    if method == "milora":
        svd_lora_init(peft_model, "minor")
    elif method == "pissa" and config.init_lora_weights is True:
        svd_lora_init(peft_model, "principal")
    if spec is not None and method == "pissa":
        peft_model = quantized_pissa(peft_model, config, targets, spec)
    return peft_model


def quantized_pissa(peft_model, config, targets: list[str], spec: quant.QuantSpec):
    """QPiSSA by peft's documented route, in memory: PiSSA's factors come from the full-precision W
    (already done: the base holds the residual W - s B A), the residual base is quantized, and a LoRA
    of the same config on the quantized base receives the PiSSA factors (peft cannot run its PiSSA SVD
    on a quantized weight: it asks for exactly this)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    factors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    residual = peft_model.unload()  # no merge: the base layers hold W - s B A
    quant.quantize_modules(residual, targets, spec)
    quantized = get_peft_model(residual, dataclasses.replace(config, init_lora_weights=True))
    set_peft_model_state_dict(quantized, factors)
    return quantized


def _has_convolutions(model: nn.Module, targets: list[str]) -> bool:
    return any(isinstance(model.get_submodule(name), nn.Conv2d) for name in targets)


@torch.no_grad()
def svd_lora_init(peft_model, components: str) -> None:
    """Start each LoRA from r singular components of its weight W (m, n; a 1x1 conv as its matrix):
    the largest (PiSSA, peft's `pissa_init` formula) or the smallest (MiLoRA, which peft lacks):
    A = sqrt(S_r) V_r^T / sqrt(s), B = U_r sqrt(S_r) / sqrt(s), and W <- W - s B A, so the model
    starts exactly at the pretrained one."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A:
            base = module.get_base_layer()
            lora_A, lora_B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            scale = module.scaling[adapter]
            weight = base.weight.view(base.weight.shape[0], -1)  # (m, n); 1x1 convs too
            r, h = lora_A.shape[0], min(weight.shape)
            wanted = torch.arange(r) if components == "principal" else torch.arange(h - r, h)
            U_r, S_r, V_r = singular_components(weight.double(), wanted, "exact")  # float64, as peft's PiSSA
            Vh_r = V_r.T
            A = (torch.diag(S_r.sqrt()) @ Vh_r) / math.sqrt(scale)  # (r, n)
            B = (U_r @ torch.diag(S_r.sqrt())) / math.sqrt(scale)  # (m, r)
            lora_A.copy_(A.view_as(lora_A).to(lora_A.dtype))
            lora_B.copy_(B.view_as(lora_B).to(lora_B.dtype))
            weight.copy_((weight.double() - scale * B @ A).to(weight.dtype))
