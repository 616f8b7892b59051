"""goat-lora: GOAT (ICML 2025) LoRA mixture-of-experts adapters for PyTorch and transformers models.

The public names load on first use (PEP 562), so `import goat_lora` does not import torch: the
`goat` command sets OMP_WAIT_POLICY before torch's OpenMP runtime starts (see cli.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {  # public name -> submodule that defines it
    "AuxLossForm": "config",
    "GoatConfig": "config",
    "InitMode": "config",
    "RoutingMode": "config",
    "ScalingMode": "config",
    "SvdMethod": "config",
    "GoatLayer": "layer",
    "GoatModel": "model",
    "get_goat_model": "model",
    "lora_equivalent_lr": "rate_rule",
    "RunSettings": "settings",
    "train": "engine",
    "evaluate_run": "engine",
    "load_run": "engine",
    "get_task": "tasks",
    "register_with_peft": "peft_integration",
}

__all__ = [
    "AuxLossForm",
    "GoatConfig",
    "GoatLayer",
    "GoatModel",
    "InitMode",
    "RoutingMode",
    "ScalingMode",
    "SvdMethod",
    "RunSettings",
    "__version__",
    "evaluate_run",
    "get_goat_model",
    "get_task",
    "load_run",
    "lora_equivalent_lr",
    "register_with_peft",
    "train",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below loads them
    from .config import AuxLossForm, GoatConfig, InitMode, RoutingMode, ScalingMode, SvdMethod
    from .layer import GoatLayer
    from .engine import evaluate_run, load_run, train
    from .model import GoatModel, get_goat_model
    from .peft_integration import register_with_peft
    from .rate_rule import lora_equivalent_lr
    from .settings import RunSettings
    from .tasks import get_task


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'goat_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
