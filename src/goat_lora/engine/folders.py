"""Run folders that are never half-written.

A run (or evaluation, or comparison) is built in the hidden sibling `.NAME.partial` and renamed to
NAME only when every file in it is written; each file is itself written to a temporary name and
renamed (`config.atomic_write_*`). Anything Python sees going wrong (an exception, Ctrl-C, SIGTERM)
removes the staging folder; a hard kill (SIGKILL) leaves it for `goat train --resume`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time

from ..config import atomic_write_text


def staging_path(output: str) -> str:
    """The hidden sibling `.NAME.partial` where `output` is built."""
    parent, name = os.path.split(os.path.abspath(output))
    return os.path.join(parent, f".{name}.partial")


def default_output(method: str, root: str = "runs") -> str:
    return os.path.join(root, f"{time.strftime('%Y%m%d-%H%M%S')}-{method}")


def check_output(output: str, overwrite: bool) -> None:
    """Refuse an --output that exists (unless overwriting) or that cannot be a folder: one under a file."""
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--output {output!r} cannot be created: {parent!r} is a file, not a folder")
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)) and not overwrite:
        raise ValueError(f"output {output!r} already exists; choose another --output or pass --overwrite")


def staging_folder(output: str) -> str:
    """A fresh, empty staging folder for `output`."""
    staging = staging_path(output)
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    return staging


def publish(staging: str, output: str) -> None:
    """Rename the finished staging folder to `output` (replacing an old one when overwriting)."""
    output = os.path.abspath(output)
    old = None
    if os.path.exists(output):
        old = f"{output}.old-{os.getpid()}"
        os.replace(output, old)
    os.replace(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.unlink(old)


@contextlib.contextmanager
def building_run_folder(output: str, main_process: bool, staging: str | None = None):
    """Yield the folder a run is built in. When the block ends cleanly, rank 0's folder is renamed
    to `output` and another rank's scratch folder is removed; when anything Python sees goes wrong
    the folder is removed, so no half-written run is left. A hard kill leaves it for --resume."""
    if staging is None:
        staging = staging_folder(output) if main_process else tempfile.mkdtemp(prefix="goat-rank-")
    try:
        yield staging
        if main_process:
            publish(staging, output)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: str, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path!r} is not valid JSON: {err}") from None
