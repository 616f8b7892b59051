"""What a method adds to the task loss besides GOAT's balance loss (which the trainer adds from the
GoatModel itself), found on the model: MixLoRA's balance loss and KaSA's regularisers."""

from __future__ import annotations

import torch
from torch import nn

from .mixlora import mixlora_balance_loss
from .peft_variants import kasa_loss


def method_loss(model: nn.Module, aux_loss_coef: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the term added to the task loss, its unweighted value for the log), or None for methods without one.
    MixLoRA: aux_loss_coef x the sum of its blocks' balance losses; KaSA: peft's beta / gamma terms."""
    balance = mixlora_balance_loss(model)
    if balance is not None:
        return aux_loss_coef * balance, balance
    regularisers = kasa_loss(model)
    if regularisers is not None and torch.is_tensor(regularisers):
        return regularisers, regularisers
    return None
