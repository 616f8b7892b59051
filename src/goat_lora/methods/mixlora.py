"""MixLoRA (Li et al. 2024, arXiv 2404.15159), a LoRA-MoE baseline of `goat compare`: each transformer
block's feed-forward network (FFN) becomes E experts that share its frozen weights and differ by their
own LoRAs; a router per block sends each token to its top-k experts; attention gets plain LoRA (peft's);
a Switch-style load-balancing loss is added to the task loss.

    expert j:  FFN_j(x) = (W2 + s B2_j A2_j) act((W1 + s B1_j A1_j) x + b1) + b2,   s = alpha / r
    block:     y = sum_{j in top-k(x)} w_j(x) FFN_j(x),   w = renormalised softmax(G x) over the top k

The routing (softmax in float32, top-k, renormalise) and the balance loss are this project's
(functional.route, routing_stats, load_balance_loss: the same computation as GOAT's). The block is
routed as a whole: the FFN's input layers (BERT's intermediate.dense; Llama's gate_proj and up_proj)
return one hidden state per top-k slot, (..., k, m), the activation between them is elementwise, and
the output layer (output.dense; down_proj) applies each slot's expert and mixes the k slots.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..functional import load_balance_loss, route, routing_stats
from ..inject import replace_module
from ..layer import in_backward_recompute

# (the FFN's input layers, its output layer), as name suffixes inside one block
FFN_LAYOUTS = (
    (("intermediate.dense",), "output.dense"),  # BERT, RoBERTa, MiniLM
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),  # Llama, SmolLM2, Mistral, Qwen
)


def find_ffn_blocks(targets: list[str]) -> list[tuple[list[str], str]]:
    """[(input layer names, output layer name)] of every FFN whose layers are all among `targets`."""
    wanted, blocks = set(targets), []
    for inputs, output in FFN_LAYOUTS:
        for name in targets:
            if name == inputs[0] or name.endswith("." + inputs[0]):
                prefix = name[: len(name) - len(inputs[0])]
                block = ([prefix + n for n in inputs], prefix + output)
                if set(block[0]) | {block[1]} <= wanted:
                    blocks.append(block)
    return blocks


class MixLoraRouter(nn.Module):
    """One FFN block's router: G (E, n), top-k per token. Keeps this forward's choice for the block's
    layers, its statistics for the balance loss, and the top-k slots per expert for `expert_load`."""

    def __init__(self, in_features: int, num_experts: int, top_k: int, generator, device):
        super().__init__()
        self.gate = nn.Linear(in_features, num_experts, bias=False, device=device)
        nn.init.kaiming_uniform_(self.gate.weight, a=math.sqrt(5), generator=generator)
        self.top_k = top_k
        self.experts = self.weights = self.stats = None  # this forward's (T, k) choice, (T, k) w, RoutingStats
        self.register_buffer(
            "slot_counts", torch.zeros(num_experts, dtype=torch.float64, device=device), persistent=False
        )

    def forward(self, tokens: torch.Tensor) -> None:  # tokens (T, n)
        routing = route(self.gate(tokens), self.top_k)  # probs, used, weights: (T, E)
        self.experts = routing.probs.topk(self.top_k, dim=-1).indices  # (T, k): the experts route() kept
        self.weights = routing.weights.gather(-1, self.experts)  # (T, k), sum 1 per token
        if in_backward_recompute():  # activation checkpointing's second forward: record the routing once
            return
        self.stats = routing_stats(routing)
        self.slot_counts += self.stats.counts.detach().double()

    def balance_loss(self) -> torch.Tensor:
        return load_balance_loss(self.stats)

    def expert_load(self) -> torch.Tensor:
        """Fraction of the top-k slots per expert since the last reset."""
        total = self.slot_counts.sum()
        return self.slot_counts / total if total > 0 else self.slot_counts.clone()

    def reset_expert_load(self) -> None:
        self.slot_counts.zero_()


class MixLoraExperts(nn.Module):
    """One Linear of an FFN with E LoRA experts. As an input layer (`mixes=False`) it maps (..., n) to one
    output per top-k slot, (..., k, m); as the output layer (`mixes=True`) it maps (..., k, n) to (..., m),
    weighting the k slots by the router. A_j Kaiming-uniform, B_j zero: the block starts at the FFN."""

    def __init__(
        self,
        base_layer: nn.Linear,
        router: MixLoraRouter,
        routes: bool,
        mixes: bool,
        rank: int,
        alpha: float,
        dropout: float,
        generator,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            # ValueError: the command line's one-line refusal (exit 2), as for the other methods' layers
            raise ValueError(f"MixLoRA adapts nn.Linear FFN layers only, not {type(base_layer).__name__}")  # noqa: TRY004
        num_experts, device = router.gate.out_features, base_layer.weight.device
        self.base_layer, self.routes, self.mixes = base_layer, routes, mixes
        self._router = (router,)  # shared by the block's layers; a submodule of the layer that routes only
        if routes:
            self.router = router
        self.rank, self.num_experts, self.scaling = rank, num_experts, alpha / rank
        self.lora_A = nn.Parameter(
            torch.empty(num_experts * rank, base_layer.in_features, device=device)
        )  # [A_1; ...; A_E]
        for j in range(num_experts):
            nn.init.kaiming_uniform_(self.lora_A[j * rank : (j + 1) * rank], a=math.sqrt(5), generator=generator)
        self.lora_B = nn.Parameter(
            torch.zeros(base_layer.out_features, num_experts * rank, device=device)
        )  # [B_1 ... B_E]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _experts_delta(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """s B_e A_e x for each slot's expert e: x (T, k, n), experts (T, k) -> (T, k, m), two matmuls
        over all experts with the other experts' columns zeroed (as HydraLoRA's heads)."""
        tokens, slots = experts.shape
        h = (self.dropout(x) @ self.lora_A.T).view(tokens, slots, self.num_experts, self.rank)  # (T, k, E, r)
        chosen = nn.functional.one_hot(experts, self.num_experts).to(h.dtype)  # (T, k, E)
        return self.scaling * (h * chosen[..., None]).flatten(2) @ self.lora_B.T  # (T, k, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router = self._router[0]
        n = self.base_layer.in_features
        if not self.mixes:  # an input layer: (..., n) -> (..., k, m)
            tokens = x.reshape(-1, n)  # (T, n)
            if self.routes:
                router(tokens)
            slots = tokens[:, None, :].expand(-1, router.top_k, -1)  # (T, k, n)
            out = self.base_layer(tokens)[:, None, :] + self._experts_delta(slots, router.experts)  # (T, k, m)
            return out.reshape(*x.shape[:-1], router.top_k, -1)
        slots = x.reshape(-1, router.top_k, n)  # (T, k, n): one FFN hidden state per slot
        out = self.base_layer(slots) + self._experts_delta(slots, router.experts)  # (T, k, m)
        mixed = (router.weights.to(out.dtype)[..., None] * out).sum(1)  # (T, m): sum_j w_j FFN_j(x)
        return mixed.reshape(*x.shape[:-2], -1)


def get_mixlora_model(model: nn.Module, settings, targets: list[str], head: list[str]) -> nn.Module:
    """Routed LoRA experts on every FFN among `targets`, peft's LoRA on the other targets (attention),
    the head trained in full. `settings.r` is each LoRA's rank (each expert's and attention's, the
    paper's r), `settings.num_experts` / `top_k` the experts per block and per token."""
    blocks = find_ffn_blocks(targets)
    if not blocks:
        layouts = "; ".join(f"{' + '.join(i)} -> {o}" for i, o in FFN_LAYOUTS)
        raise ValueError(f"--method mixlora: no feed-forward block among the adapted layers (it knows {layouts})")
    for param in model.parameters():
        param.requires_grad_(False)
    routed = []
    for index, (inputs, output) in enumerate(blocks):
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
        first = model.get_submodule(inputs[0])
        router = MixLoraRouter(first.in_features, settings.num_experts, settings.top_k, generator, first.weight.device)
        for name in [*inputs, output]:
            layer = MixLoraExperts(
                model.get_submodule(name),
                router,
                routes=name == inputs[0],
                mixes=name == output,
                rank=settings.r,
                alpha=settings.lora_alpha,
                dropout=settings.dropout,
                generator=generator,
            )
            replace_module(model, name, layer)
            routed.append(layer)
    in_blocks = {name for inputs, output in blocks for name in [*inputs, output]}
    attention = [name for name in targets if name not in in_blocks]
    if attention:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(settings.seed)  # peft draws lora_A from the global generator
        model = get_peft_model(
            model,
            LoraConfig(
                r=settings.r,
                lora_alpha=settings.lora_alpha,
                lora_dropout=settings.dropout,
                target_modules=attention,
                modules_to_save=head or None,
            ),
        )
    for layer in routed:  # peft freezes every parameter it did not add
        for name, param in layer.named_parameters():
            param.requires_grad_(not name.startswith("base_layer."))
    for name in head if not attention else []:
        model.get_submodule(name).requires_grad_(True)
    return model


def mixlora_balance_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum over blocks of the last forward's balance loss (Switch form, as GOAT's), or None without MixLoRA."""
    losses = [m.balance_loss() for m in model.modules() if isinstance(m, MixLoraRouter) and m.stats is not None]
    return torch.stack(losses).sum() if losses else None
