"""HydraLoRA (Tian et al., NeurIPS 2024), a baseline of `goat compare`: one shared A, one B per expert,
a dense softmax router."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..inject import replace_module


class HydraLoraLayer(nn.Module):
    """HydraLoRA (Tian et al., NeurIPS 2024): one shared A, E heads B_j, a dense softmax router.

        y = W0 x + b + s * sum_j p_j(x) B_j A dropout(x),   p = softmax(G x),  s = alpha / r

    A (r, n) is Kaiming-uniform, every B_j (m, r) starts at zero (so the model starts at W0); all
    heads are computed at once: [p_1 h, ..., p_E h] (T, E r) @ [B_1^T; ...; B_E^T] (E r, m).
    """

    def __init__(self, base_layer: nn.Module, rank: int, num_experts: int, alpha: float, dropout: float, generator):
        super().__init__()
        if isinstance(base_layer, nn.Linear):
            in_features, out_features = base_layer.in_features, base_layer.out_features
        elif isinstance(base_layer, nn.Conv2d) and tuple(base_layer.kernel_size) == (1, 1) and base_layer.groups == 1:
            in_features, out_features = base_layer.in_channels, base_layer.out_channels
        else:
            raise ValueError(f"HydraLoRA cannot adapt {type(base_layer).__name__}; supported: nn.Linear, 1x1 nn.Conv2d")
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.num_experts, self.scaling = rank, num_experts, alpha / rank
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))  # shared
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank, device=device))  # one per expert
        self.router = nn.Linear(in_features, num_experts, bias=False, device=device)
        nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5), generator=generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer(
            "load_sums", torch.zeros(num_experts, dtype=torch.float64, device=device), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        conv = isinstance(self.base_layer, nn.Conv2d)
        tokens = (x.movedim(1, -1) if conv else x).reshape(-1, self.in_features).float()  # (T, n)
        probs = torch.softmax(self.router(tokens), dim=-1)  # (T, E)
        h = self.dropout(tokens) @ self.lora_A.T  # (T, r)
        mixed = (probs[:, :, None] * h[:, None, :]).reshape(len(tokens), -1)  # (T, E r)
        B_cat = self.lora_B.permute(0, 2, 1).reshape(-1, self.out_features)  # (E r, m)
        delta = self.scaling * mixed @ B_cat  # (T, m)
        self.load_sums += probs.detach().sum(0).double()
        if conv:
            batch, _, height, width = result.shape
            delta = delta.reshape(batch, height, width, self.out_features).movedim(-1, 1)
        else:
            delta = delta.reshape(result.shape)
        return result + delta.to(result.dtype)

    def expert_load(self) -> torch.Tensor:
        """Mean router probability per expert since the last reset (dense routing: no top-k)."""
        total = self.load_sums.sum()
        return self.load_sums / total if total > 0 else self.load_sums.clone()

    def reset_expert_load(self) -> None:
        self.load_sums.zero_()


def get_hydralora_model(model: nn.Module, settings, targets: list[str], head: list[str]) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    for index, name in enumerate(targets):
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
        layer = HydraLoraLayer(
            model.get_submodule(name),
            settings.r,
            settings.num_experts,
            settings.lora_alpha,
            settings.dropout,
            generator,
        )
        layer.base_layer.requires_grad_(False)
        replace_module(model, name, layer)
    for name in head:
        model.get_submodule(name).requires_grad_(True)
    return model
