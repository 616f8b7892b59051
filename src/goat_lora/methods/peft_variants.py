"""KaSA and LoRA-GA, two baselines of the paper's tables, built by peft's own configs (not re-written):

  kasa      LoraConfig(kasa_config=KasaConfig()): the base weight loses its r smallest singular
            components, and the update is s B diag(dS) A. peft leaves KaSA's two regularisers
            (beta ||dS||^2, gamma (||B^T B - I|| + ||A A^T - I||)) to the training loop: the trainer
            adds peft's `_get_kasa_loss` to the task loss (`kasa_loss` below).
  lora_ga   LoraConfig(init_lora_weights="lora_ga") after `preprocess_loraga`: A and B start from the SVD
            of the full weights' gradient averaged over a few of the run's training batches, and the
            base weight becomes W - s B0 A0 (so the model starts at the pretrained one).

LoRA-GA's start depends on data, so the run folder keeps the changed base weights beside the trained
tensors (`data_dependent_state`): `goat eval` rebuilds the structure without data and loads both.
"""

from __future__ import annotations

import time

import torch
from torch import nn

# peft attribute each method needs, and the first peft version this project ran it with
PEFT_SUPPORT = {"kasa": ("KasaConfig", "0.21.2"), "lora_ga": ("LoraGAConfig", "0.21.2")}


def check_peft_support(method: str) -> None:
    """Refuse, in one line, a method the installed peft lacks, naming the version it needs."""
    import peft

    attribute, version = PEFT_SUPPORT[method]
    if not hasattr(peft, attribute):
        raise ValueError(
            f"--method {method} needs peft >= {version} (peft.{attribute}); the installed peft "
            f"{peft.__version__} lacks it: pip install 'peft>={version}'"
        )


def _linear_only(method: str, model: nn.Module, targets: list[str]) -> None:
    """peft runs KaSA and LoRA-GA on nn.Linear only (LoRA-GA also GPT-2's Conv1D); say so in one line."""
    others = sorted({type(model.get_submodule(name)).__name__ for name in targets} - {"Linear"})
    if others:
        raise ValueError(
            f"--method {method}: peft adapts nn.Linear layers only; this model's targets include "
            f"{', '.join(others)} (e.g. the image model's 1x1 convolutions)"
        )


def _lora_config(settings, targets: list[str], head: list[str], **extra):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=head or None,
        **extra,
    )


def get_kasa_model(model: nn.Module, settings, targets: list[str], head: list[str]):
    check_peft_support("kasa")  # before the import, which would fail with a less helpful message
    from peft import KasaConfig, get_peft_model

    _linear_only("kasa", model, targets)
    torch.manual_seed(settings.seed)  # peft draws lora_A and lora_diag from the global generator
    return get_peft_model(model, _lora_config(settings, targets, head, kasa_config=KasaConfig()))


def kasa_loss(model: nn.Module) -> torch.Tensor | None:
    """KaSA's regularisers as peft computes them (beta and gamma from its KasaConfig), or None when
    `model` is not a KaSA model."""
    lora_model = getattr(model, "base_model", None)
    config = getattr(model, "peft_config", {}).get("default")
    if getattr(config, "kasa_config", None) is None or not callable(getattr(lora_model, "_get_kasa_loss", None)):
        return None
    return lora_model._get_kasa_loss()  # peft's documented way to add them to the loss


def loraga_batches(settings, train, collator) -> list[dict]:
    """`settings.lora_ga_batches` batches of `settings.batch_size` examples of the run's training split,
    drawn with the run's seed, for LoRA-GA's gradient estimate."""
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(train), generator=generator).tolist()
    size = settings.batch_size
    picked = [order[i * size : (i + 1) * size] for i in range(settings.lora_ga_batches)]
    return [collator([train[i] for i in rows]) for rows in picked if rows]


def get_loraga_model(model: nn.Module, settings, targets: list[str], head: list[str], batches: list[dict] | None):
    """LoRA-GA through peft. `batches`: the training batches the gradient is averaged over; None builds
    the structure only (peft then starts A, B as LoRA does), for counting parameters or for reloading a
    run whose tensors, changed base weights included, come from its folder."""
    check_peft_support("lora_ga")
    from peft import LoraGAConfig, get_peft_model, preprocess_loraga

    _linear_only("lora_ga", model, targets)
    config = _lora_config(settings, targets, head, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    cost = None
    if batches is not None:
        device = next(model.parameters()).device
        started = time.time()

        def train_step() -> None:  # peft averages the weights' gradients over these backward passes
            for batch in batches:
                model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).loss.backward()

        preprocess_loraga(model, config, train_step)
        cost = {
            "batches": len(batches),
            "examples": sum(len(b["labels"]) for b in batches if "labels" in b),
            "gradient_s": time.time() - started,
        }
    torch.manual_seed(settings.seed)
    peft_model = get_peft_model(model, config)
    if cost is not None:
        cost["seconds"] = time.time() - started  # the gradient estimate and peft's SVD of it
        peft_model.goat_init_cost = {"lora_ga_init": cost}
    return peft_model


def data_dependent_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Frozen tensors whose values came from the training data (LoRA-GA's W - s B0 A0): a run folder
    must keep them, since a rebuild without the data cannot recompute them. Empty for other methods."""
    config = getattr(model, "peft_config", {}).get("default")
    if getattr(config, "init_lora_weights", None) != "lora_ga":
        return {}
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            state[f"{name}.base_layer.weight"] = module.get_base_layer().weight.detach().cpu().contiguous()
    return state


def init_cost(model: nn.Module) -> dict:
    """What a method's start cost apart from training (LoRA-GA: its gradient estimate), for metrics.json."""
    return dict(getattr(model, "goat_init_cost", None) or {})
