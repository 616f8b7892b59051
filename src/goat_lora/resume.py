"""Resuming a training run that was killed (SIGKILL, power loss, out of memory) after a checkpoint.

Where an unfinished run lives: `goat train --output runs/x` builds the run in the hidden staging
folder `runs/.x.partial` and renames it to `runs/x` only when everything is written. With
`--save-steps N` the transformers Trainer checkpoints every N optimisation steps into
`runs/.x.partial/.trainer/checkpoint-<step>/` (weights, optimizer, scheduler, RNG states,
trainer_state.json; the last one is kept), next to `goat_resume.json` (the run's TrainArgs and
output). A killed process runs no cleanup, so these stay; `goat train --resume runs/x` (or the
staging path itself) reads them, rebuilds the same task and model, and continues from the newest
*complete* checkpoint with `Trainer.train(resume_from_checkpoint=...)`.

Failures that Python sees (an exception, Ctrl-C, SIGTERM) still remove the staging folder, and a new
run without --resume on the same output starts from scratch (the stale staging folder is replaced).
Classification and `--task causal-lm` runs resume alike. `goat compare --resume` is different: it
reuses the whole finished runs of an interrupted comparison (goat_lora.train.compare).
"""

from __future__ import annotations

import json
import os
import re

RESUME_FILE = "goat_resume.json"
TRAINER_DIR = ".trainer"
# The Trainer writes trainer_state.json after the weights, optimizer and RNG states, so a
# checkpoint folder without it was cut off while being written.
COMPLETE_MARKER = "trainer_state.json"


def staging_path(output: str) -> str:
    """The hidden sibling `.NAME.partial` where the run `output` is built (see train.staging_folder)."""
    parent, name = os.path.split(os.path.abspath(output))
    return os.path.join(parent, f".{name}.partial")


def write_resume_state(staging: str, args_dict: dict, output: str, overwrite: bool) -> None:
    from .config import atomic_write_text

    state = {"args": args_dict, "output": os.path.abspath(output), "overwrite": overwrite}
    atomic_write_text(os.path.join(staging, TRAINER_DIR, RESUME_FILE), json.dumps(state, indent=2) + "\n")


def last_checkpoint(staging: str) -> str | None:
    """The newest complete `checkpoint-<step>` folder under staging/.trainer, or None."""
    folder = os.path.join(staging, TRAINER_DIR)
    if not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isfile(os.path.join(folder, name, COMPLETE_MARKER)):
            steps.append(int(match.group(1)))
    return os.path.join(folder, f"checkpoint-{max(steps)}") if steps else None


def find_resumable(run: str) -> tuple[dict, str, str]:
    """(saved state, staging folder, checkpoint) for `goat train --resume RUN`; RUN is the run's
    --output or its `.NAME.partial` staging folder. Clear errors when there is nothing to resume."""
    run = os.path.abspath(run)
    candidates = [run] if os.path.basename(run).endswith(".partial") else [staging_path(run)]
    staging = next((c for c in candidates if os.path.isdir(c)), None)
    if staging is None:
        if os.path.isfile(os.path.join(run, "metrics.json")):
            raise ValueError(f"--resume {run!r}: this run already finished; nothing to resume")
        raise FileNotFoundError(
            f"--resume {run!r}: no unfinished run there ({candidates[0]!r} does not exist)"
        )
    state_path = os.path.join(staging, TRAINER_DIR, RESUME_FILE)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"--resume {run!r}: {state_path!r} is missing; the run cannot be resumed")
    try:
        with open(state_path, encoding="utf-8") as fh:
            state = json.load(fh)
        state["args"], state["output"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--resume {run!r}: {state_path!r} is unreadable: {err}") from None
    checkpoint = last_checkpoint(staging)
    if checkpoint is None:
        raise ValueError(
            f"--resume {run!r}: no complete checkpoint in {os.path.join(staging, TRAINER_DIR)!r} "
            "(the run was killed before its first --save-steps checkpoint); start it again"
        )
    return state, staging, checkpoint


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}


def train_args_from_dict(saved: dict, source: str):
    """TrainArgs from a saved dict (config.json's "args", goat_resume.json), refusing unknown fields
    and values of the wrong type with one line naming `source`, the field and the value."""
    import dataclasses

    from .train import TrainArgs

    if not isinstance(saved, dict):
        raise ValueError(f"{source}: the settings must be a JSON object, got {type(saved).__name__}")
    fields = {f.name: f for f in dataclasses.fields(TrainArgs)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown}; known: {sorted(fields)}")
    for name, value in saved.items():
        allowed = [t.strip() for t in str(fields[name].type).split("|")]
        ok = any(
            (t == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value))
            or (t in _TYPES and isinstance(value, _TYPES[t]) and not (t != "bool" and isinstance(value, bool)))
            for t in allowed
        )
        if not ok:
            raise ValueError(f"{source}: setting {name}={value!r} must be {' or '.join(allowed)}")
    args = TrainArgs(**saved)
    args.validate()
    return args


def read_config_file(path: str):
    """TrainArgs from `goat train --config FILE` (a run's config.json or a plain JSON object of settings)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"config {path!r} is not valid JSON: {err}") from None
    if isinstance(saved, dict) and isinstance(saved.get("args"), dict):
        saved = saved["args"]
    return train_args_from_dict(saved, f"config {path!r}")


def resume(run: str, *, overwrite: bool = False, quiet: bool = False) -> dict:
    """Continue a killed `goat train` run from its newest complete checkpoint; returns its metrics."""
    from .train import train

    state, staging, checkpoint = find_resumable(run)
    args = train_args_from_dict(state["args"], f"--resume {run!r}: {os.path.join(staging, TRAINER_DIR, RESUME_FILE)!r}")
    return train(
        args, state["output"], overwrite=overwrite or bool(state.get("overwrite")), quiet=quiet,
        resume_checkpoint=checkpoint,
    )  # fmt: skip
