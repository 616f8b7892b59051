"""Methods compared with GOAT: the registry (names, learning rates, quantizability, preparation),
peft's methods, HydraLoRA, and the experts' load of any of them."""

from .load import expert_load, recording_expert_load, reset_expert_load
from .registry import (
    DEFAULT_LR,
    DEFAULT_LR_GRID,
    GOAT_METHODS,
    GOAT_PRESETS,
    METHODS,
    NOT_QUANTIZABLE,
    PEFT_METHODS,
    QUANTIZABLE,
    check_adapter,
    check_method,
    check_quantize,
    count_parameters,
    goat_config_for,
    method_defaults,
    prepare_model,
)

__all__ = [
    "DEFAULT_LR", "DEFAULT_LR_GRID", "GOAT_METHODS", "GOAT_PRESETS", "METHODS", "NOT_QUANTIZABLE", "PEFT_METHODS",
    "QUANTIZABLE", "check_adapter", "check_method", "check_quantize", "count_parameters", "expert_load", "goat_config_for",
    "method_defaults", "prepare_model", "recording_expert_load", "reset_expert_load",
]  # fmt: skip
