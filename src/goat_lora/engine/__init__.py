"""The training engine, generic over task families (goat_lora.tasks): the transformers Trainer with
GOAT's balance loss, run folders, resume, evaluation of saved runs and comparisons.

Names are imported on first use: `engine.resolve` (settings, data, checks) loads no Trainer, peft or
bitsandbytes, so the command line can refuse bad input before the heavy modules load."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Comparison": "resolve",
    "compare": "comparison",
    "evaluate_run": "run",
    "load_run": "run",
    "Writing": "run",
    "given_settings": "resolve",
    "preflight": "resolve",
    "read_config_file": "resolve",
    "resolve_run": "resolve",
    "Run": "resolve",
    "resume": "run",
    "summary_line": "run",
    "train": "run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
