"""Run folders that are never half-written.

A run (or evaluation) is built in a hidden sibling of its own, `.NAME.<random>.partial`, and renamed
to NAME only when every file in it is written; each file is itself written to a temporary name and
renamed (`files.atomic_write_*`). Two runs started with the same --output therefore never share a
folder, and publishing refuses (one line) when NAME appeared while the run trained, unless the run
was asked to overwrite: no run reports a folder it did not write whole. Anything Python sees going
wrong (an exception, Ctrl-C, SIGTERM) removes the staging folder; a hard kill (SIGKILL) leaves it
for `goat train --resume`. A comparison, which resumes into its staging folder by name, keeps the
fixed `.NAME.partial` (staging_path).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
import time

from ..files import atomic_write_text


def staging_path(output: str) -> str:
    """The hidden sibling `.NAME.partial` where a comparison for `output` is built (and resumed)."""
    parent, name = os.path.split(os.path.abspath(output))
    return os.path.join(parent, f".{name}.partial")


def run_staging_folders(output: str) -> list[str]:
    """The staging folders of runs for `output` (`.NAME.<random>.partial`, and `.NAME.partial` of
    goat-lora before per-run staging), newest first."""
    parent, name = os.path.split(os.path.abspath(output))
    found = glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.*.partial")) + [staging_path(output)]
    return sorted((f for f in found if os.path.isdir(f)), key=os.path.getmtime, reverse=True)


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


def staging_folder(output: str, shared: bool = False) -> str:
    """A fresh, empty staging folder for `output`: this process's own `.NAME.<random>.partial`, or
    with `shared` the fixed `.NAME.partial` (emptied first) that a comparison resumes into."""
    parent, name = os.path.split(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    if not shared:
        return tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent)
    staging = staging_path(output)
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    return staging


def publish(staging: str, output: str, replace: bool = False) -> None:
    """Rename the finished staging folder to `output`. `replace` (--overwrite): an old `output` is
    replaced. Otherwise an `output` that another process wrote meanwhile is refused in one line (the
    rename itself refuses a folder that is not empty, so there is no window between check and rename)."""
    output = os.path.abspath(output)
    if not replace:
        try:
            os.rename(staging, output)  # onto nothing, or an empty folder
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise ValueError(
                f"output {output!r} was written by another process while this one ran; "
                "nothing of this run was kept (use another --output, or --overwrite)"
            ) from None
        return
    old = None
    if os.path.exists(output):
        old = f"{output}.old-{os.getpid()}"
        os.replace(output, old)
    os.replace(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.unlink(old)


@contextlib.contextmanager
def building_run_folder(output: str, main_process: bool, staging: str | None = None, replace: bool = False):
    """Yield the folder a run is built in. When the block ends cleanly, rank 0's folder is renamed
    to `output` (publish: refused if another process wrote `output` meanwhile, unless `replace`) and
    another rank's scratch folder is removed; when anything Python sees goes wrong the folder is
    removed, so no half-written run is left. A hard kill leaves it for --resume."""
    if staging is None:
        staging = staging_folder(output) if main_process else tempfile.mkdtemp(prefix="goat-rank-")
    try:
        yield staging
        if main_process:
            publish(staging, output, replace)
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
