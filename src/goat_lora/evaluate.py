"""Evaluation: accuracy on a split, and router statistics (how evenly the experts were used)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .baselines import expert_load, reset_expert_load


def router_statistics(load: dict[str, list[float]]) -> dict:
    """Summaries of a layer -> per-expert fraction table.

    balance: mean over layers of the normalised entropy of the load (1 = every expert used equally,
    0 = one expert takes everything); max_share: the largest fraction any expert got in any layer;
    unused_experts: (layer, expert) pairs that received under 1% of the tokens."""
    if not load:
        return {}
    entropies, max_share, unused = [], 0.0, 0
    for fractions in load.values():
        E = len(fractions)
        h = -sum(p * math.log(p) for p in fractions if p > 0)
        entropies.append(h / math.log(E) if E > 1 else 1.0)
        max_share = max(max_share, max(fractions))
        unused += sum(1 for p in fractions if p < 0.01)
    return {
        "balance": sum(entropies) / len(entropies),
        "max_share": max_share,
        "unused_experts": unused,
        "layers": len(load),
    }


@torch.no_grad()
def evaluate(model: nn.Module, dataset, collator, batch_size: int = 64, device: str | torch.device = "cpu") -> dict:
    """Accuracy and mean loss of `model` on `dataset` (items -> `collator` -> model inputs with
    labels), plus the experts' load over this pass and its summary."""
    was_training = model.training
    model.eval()
    reset_expert_load(model)
    correct, total, loss_sum = 0, 0, 0.0
    predictions: list[int] = []
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs = model(**batch)
        labels = batch["labels"]
        predicted = outputs.logits.argmax(dim=-1)
        correct += int((predicted == labels).sum())
        total += len(labels)
        loss_sum += float(outputs.loss) * len(labels) if outputs.loss is not None else 0.0
        predictions.extend(int(p) for p in predicted)
    load = expert_load(model)
    reset_expert_load(model)
    model.train(was_training)
    return {
        "accuracy": correct / total if total else float("nan"),
        "loss": loss_sum / total if total else float("nan"),
        "num_examples": total,
        "predictions": predictions,
        "expert_load": load,
        "router": router_statistics(load),
    }
