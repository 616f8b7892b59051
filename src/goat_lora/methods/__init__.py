"""Methods compared with GOAT: the registry (names, learning rates, quantizability, preparation),
peft's methods and variants (KaSA, LoRA-GA), HydraLoRA, MixLoRA, the experts' load of any of them, and
the losses a method adds to the task loss."""

from .load import expert_load, recording_expert_load, reset_expert_load
from .losses import method_loss
from .peft_variants import data_dependent_state, init_cost, loraga_batches
from .registry import (
    DEFAULT_LR,
    DEFAULT_LR_GRID,
    GOAT_METHODS,
    GOAT_PRESETS,
    METHODS,
    NOT_QUANTIZABLE,
    PEFT_METHODS,
    PEFT_VARIANTS,
    QUANTIZABLE,
    RATE_RULE_METHODS,
    check_adapter,
    check_method,
    check_quantize,
    count_parameters,
    goat_config_for,
    method_defaults,
    prepare_model,
)

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_LR_GRID",
    "GOAT_METHODS",
    "GOAT_PRESETS",
    "METHODS",
    "NOT_QUANTIZABLE",
    "PEFT_METHODS",
    "PEFT_VARIANTS",
    "QUANTIZABLE",
    "RATE_RULE_METHODS",
    "check_adapter",
    "check_method",
    "check_quantize",
    "count_parameters",
    "data_dependent_state",
    "expert_load",
    "goat_config_for",
    "init_cost",
    "loraga_batches",
    "method_defaults",
    "method_loss",
    "prepare_model",
    "recording_expert_load",
    "reset_expert_load",
]
