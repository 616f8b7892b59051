"""The training engine, generic over task families (goat_lora.tasks): the transformers Trainer with
GOAT's balance loss, run folders, resume, evaluation of saved runs and comparisons."""

from __future__ import annotations

from .comparison import compare
from .run import evaluate_run, load_run, read_config_file, resolve_settings, resume, summary_line, train

__all__ = ["compare", "evaluate_run", "load_run", "read_config_file", "resolve_settings", "resume", "summary_line", "train"]
