"""Where a killed run's checkpoints live, and finding the newest complete one.

`goat train --output runs/x --save-steps N` builds the run in `runs/.x.<random>.partial` (engine.folders);
the transformers Trainer checkpoints every N optimisation steps into
`runs/.x.<random>.partial/.trainer/checkpoint-<step>/` (weights, optimizer, scheduler, RNG states,
trainer_state.json; the last one is kept), next to `goat_resume.json` (the run's settings as given,
before defaults, and its output). A killed process runs no cleanup, so these stay;
`goat train --resume runs/x` (engine.run.resume) rebuilds the same task and model from them and
continues from the newest *complete* checkpoint; when several killed runs left staging folders for
runs/x, the most recently written one that can be resumed. Every task family resumes alike. `goat compare
--resume` is different: it reuses the whole finished runs of an interrupted comparison
(engine.comparison).
"""

from __future__ import annotations

import json
import os
import re

from ..files import atomic_write_text
from .folders import run_staging_folders

RESUME_FILE = "goat_resume.json"
TRAINER_DIR = ".trainer"
# The Trainer writes trainer_state.json after the weights, optimizer and RNG states, so a
# checkpoint folder without it was cut off while being written.
COMPLETE_MARKER = "trainer_state.json"


def write_resume_state(staging: str, requested: dict, output: str, overwrite: bool) -> None:
    state = {"args": requested, "output": os.path.abspath(output), "overwrite": overwrite}
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


def find_resumable(run: str) -> tuple[dict, str, str, str]:
    """(saved state, staging folder, checkpoint, state file) for `goat train --resume RUN`; RUN is
    the run's --output or its `.NAME.<random>.partial` staging folder. Clear errors when there is nothing to resume."""
    run = os.path.abspath(run)
    if os.path.basename(run).endswith(".partial"):
        staging = run
    else:  # the newest staging folder with a resume state, else the newest at all (its errors name it)
        candidates = run_staging_folders(run)
        resumable = [f for f in candidates if os.path.isfile(os.path.join(f, TRAINER_DIR, RESUME_FILE))]
        staging = (
            resumable or candidates or [os.path.join(os.path.dirname(run), f".{os.path.basename(run)}.*.partial")]
        )[0]
    if not os.path.isdir(staging):
        if os.path.isfile(os.path.join(run, "metrics.json")):
            raise ValueError(f"--resume {run!r}: this run already finished; nothing to resume")
        raise FileNotFoundError(f"--resume {run!r}: no unfinished run there ({staging!r} does not exist)")
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
    return state, staging, checkpoint, state_path
