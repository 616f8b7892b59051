"""A reproduction of the public GOAT layer's forward (Facico/GOAT-PEFT: a per-expert loop with index
gathers), written from its description, to time against; it computes the same function as GoatLayer."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import functional as F
from ..layer import in_backward_recompute


def use_public_layer_forward(layer: nn.Module) -> None:
    """Make `layer` (a GoatLayer around an nn.Linear) run `_public_layer_forward`: adds one dropout
    module per expert (as the public layer's experts each own one) and the scales s_j as Python floats
    (the public experts keep a float attribute; reading them once here avoids a device sync per step)."""
    _require_linear(layer)
    p = layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0
    layer.public_dropouts = nn.ModuleList(  # a submodule list, so model.train() / .eval() reach them
        nn.Dropout(p) if p > 0 else nn.Identity() for _ in range(layer.num_experts)
    )
    layer.public_scales = [float(s) for s in layer.expert_scale.tolist()]
    layer.forward = functools.partial(_public_layer_forward, layer)


def _require_linear(layer: nn.Module) -> None:
    if not isinstance(layer.base_layer, nn.Linear):
        raise TypeError(
            f"goat_public reproduces the public GOAT layer for nn.Linear only; this layer adapts a "
            f"{type(layer.base_layer).__name__}"
        )


def _public_layer_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    r"""The public GOAT layer's forward (Facico/GOAT-PEFT, TopKGOATLayer + GOATExpert), reproduced
    on this project's parameters, FOR TIMING ONLY (`goat bench` method goat_public).

    It computes the same function as GoatLayer.forward (the tests check logits and gradients with
    dropout off) but does the public layer's work, including its extra work:

    * base output; x cast to the adapter dtype and flattened to tokens (T, n);
    * gate p = softmax(router(tokens)); top-k of p; weights renormalised to sum 1;
    * the output buffer is zeros shaped like expert 0 applied to ALL T tokens: that pass (dropout,
      A_0, B_0, scale) really runs, and only its shape is kept;
    * for each expert j: (token_index, slot) = where(topk_index == j);
      results[token_index] += w[token_index, slot] * s_j B_j A_j dropout_j(tokens[token_index]),
      each expert drawing its OWN dropout on its gathered copy of the inputs (k T n dropout work in
      all, not T n) and accumulating by gather, add and index_put (`results[idx] += ...`);
    * the balance-loss statistics from bincount of the chosen experts: the loss
      E * sum_j (count_j / T) * mean_t p_j is evaluated by model.aux_loss() from layer.last_stats,
      the same formula, once per step as in the public code (no padding mask: the public layer has none);
    * result + the experts' sum.

    Expert j is rows j d:(j+1) d of lora_A and columns j d:(j+1) d of lora_B (slices, so gradients
    reach the same parameters as GOAT's); s_j is expert_scale[j]; the dropouts are
    `layer.public_dropouts` (set up by use_public_layer_forward).
    """
    _require_linear(layer)
    d, num_experts = layer.expert_rank, layer.num_experts

    def expert(j: int, inputs: torch.Tensor) -> torch.Tensor:  # GOATExpert: s_j * B_j(A_j(dropout_j(x)))
        A_j = layer.lora_A[j * d : (j + 1) * d]  # (d, n)
        B_j = layer.lora_B[:, j * d : (j + 1) * d]  # (m, d)
        hidden = nn.functional.linear(layer.public_dropouts[j](inputs), A_j)
        return nn.functional.linear(hidden, B_j) * layer.public_scales[j]

    result = layer.base_layer(x)
    tokens = x.to(layer.lora_A.dtype).reshape(-1, layer.in_features)  # (T, n)
    probs = torch.softmax(layer.router(tokens), dim=-1)  # (T, E)
    top_probs, topk_index = probs.topk(layer.top_k, dim=-1)  # (T, k)
    top_weights = top_probs / top_probs.sum(dim=-1, keepdim=True)

    results = torch.zeros_like(expert(0, tokens))  # the shape probe: expert 0 over all T tokens
    for j in range(num_experts):
        token_index, slot = torch.where(topk_index == j)
        results[token_index] += top_weights[token_index, slot, None] * expert(j, tokens[token_index])

    counts = torch.bincount(topk_index.reshape(-1), minlength=num_experts)  # (E,)
    if not in_backward_recompute():  # as GoatLayer._record: a checkpointing recompute records nothing
        layer.last_stats = F.RoutingStats(
            probs.sum(dim=0), counts.float(), torch.full((), float(tokens.shape[0]), device=tokens.device)
        )
    return result + results.reshape(*result.shape[:-1], layer.out_features).to(result.dtype)
