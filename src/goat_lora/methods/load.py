"""The experts' load of any method's model, by duck typing: a GoatModel answers for all its layers
(`expert_load()` -> {layer: load}); otherwise every module with an `expert_load()` of its own (a
HydraLoRA layer) answers for itself. Methods without a router have none."""

from __future__ import annotations

import contextlib

from torch import nn


def _answers_for_its_layers(model: nn.Module) -> bool:
    return callable(getattr(model, "goat_layers", None))  # a GoatModel


def expert_load(model: nn.Module) -> dict[str, list[float]]:
    """layer name -> fraction of tokens per expert (GOAT: top-k slots; HydraLoRA: mean router
    probability); empty for methods without a router."""
    if _answers_for_its_layers(model):  # its layers' loads, summed over processes
        return {name: [float(v) for v in load] for name, load in model.expert_load().items()}
    return {
        name: [float(v) for v in module.expert_load()]
        for name, module in model.named_modules()
        if module is not model and callable(getattr(module, "expert_load", None))
    }


def reset_expert_load(model: nn.Module) -> None:
    if _answers_for_its_layers(model):
        model.reset_expert_load()
        return
    for module in model.modules():
        if module is not model and callable(getattr(module, "reset_expert_load", None)):
            module.reset_expert_load()


def recording_expert_load(model: nn.Module):
    """A context in which evaluation forwards (no autograd) count the experts' load too: GOAT skips that
    bookkeeping at inference unless asked (GoatModel.recording_routing); HydraLoRA always counts."""
    recording = getattr(model, "recording_routing", None)
    return recording() if callable(recording) else contextlib.nullcontext()
