"""What a person at the console sees, whatever the installed libraries print: one error line (exit 2)
with HF_HUB_OFFLINE set and unset, library chatter kept in the run folder's library.log (or printed
with --verbose), no heavy import for input that is refused early, rows left out of the data said in
words, concurrent runs with one --output, and Ctrl-C's message as the last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from goat_lora.cli import main

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
    "--report-to",
    "none",
]
HUB_OFFLINE = pytest.mark.parametrize("offline", ["set", "unset"])


def _env(offline: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if offline == "set":
        env["HF_HUB_OFFLINE"] = "1"
    return {**env, "OMP_NUM_THREADS": "1"}


def _goat(args: list[str], offline: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "goat_lora.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(offline),
        **kwargs,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer BERT and a reviews file (tests/test_reliability's)."""
    from test_reliability import reviews_file, save_tiny_bert

    root = tmp_path_factory.mktemp("console")
    return {"bert": save_tiny_bert(root / "bert", seed=0), "data": reviews_file(root)}


# ---- one line, whatever the libraries print -------------------------------------------------------
BAD = {
    "missing-data-file": (lambda t, a: ["train", "--data", str(t / "missing.csv")], "data file"),
    "compare-zero-seeds": (
        lambda t, a: ["compare", "--data", a["data"], "--seeds", "0"],
        "argument --seeds: must be at least 1, got 0",
    ),
    "model-folder-missing": (
        lambda t, a: ["train", "--model", "./no-such-folder", "--data", a["data"]],
        "model folder './no-such-folder' does not exist; --model takes a local folder, a hub name "
        "(namespace/name) or a shipped model: minilm, smollm2, efficientnet-lite0",
    ),
    "output-under-a-file": (
        lambda t, a: ["train", "--data", a["data"], "--output", str(t / "file" / "sub")],
        "--output '{t}/file/sub' cannot be created: '{t}/file' is a file, not a folder",
    ),
}


@HUB_OFFLINE
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_exactly_one_line_in_a_fresh_process(case, offline, tiny, tmp_path):
    (tmp_path / "file").write_text("a regular file\n")
    argv, message = BAD[case]
    result = _goat(argv(tmp_path, tiny), offline, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # exactly one line, and it ends the output
    assert message.format(t=tmp_path) in result.stderr and "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["file"]  # nothing written


def test_refused_data_loads_neither_peft_nor_bitsandbytes_nor_a_model(tmp_path):
    """A missing data file is refused before the Trainer, peft, bitsandbytes or transformers' model code load."""
    probe = textwrap.dedent(f"""
        import sys
        from goat_lora.cli import main
        for argv in (["train", "--data", {str(tmp_path / "missing.csv")!r}],
                     ["compare", "--data", {str(tmp_path / "missing.csv")!r}]):
            assert main(argv) == 2
        heavy = ("peft", "bitsandbytes", "kernels", "transformers.modeling_utils", "transformers.trainer")
        print(sorted(name for name in heavy if name in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert result.stderr.count("\n") == 2  # the two error lines, nothing else


def test_library_warnings_are_kept_in_the_run_folder(tiny, tmp_path):
    """What a library logs while a run works (as peft and transformers do while a model loads) is not
    lost and not on the console: RUN/library.log keeps it and one stdout line says so."""
    probe = textwrap.dedent(f"""
        import logging, sys, warnings
        import goat_lora.engine.resolve as resolve
        from goat_lora.cli import main
        real = resolve.preflight
        def preflight(*args, **kwargs):
            logging.getLogger("somelib").warning("loading somelib")
            warnings.warn("somelib's option is deprecated")
            return real(*args, **kwargs)
        resolve.preflight = preflight
        sys.exit(main(["train", "--model", {tiny["bert"]!r}, "--data", {tiny["data"]!r}, "--output",
                       {str(tmp_path / "run")!r}, *{TINY!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=_env("set"))
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "run" / "library.log").read_text()
    assert "WARNING somelib: loading somelib" in log and "somelib's option is deprecated" in log
    assert f"library warning(s) kept in {tmp_path / 'run' / 'library.log'}" in result.stdout
    assert "somelib" not in result.stderr


def test_verbose_prints_library_records_as_they_come(tmp_path, capsys):
    import logging

    import goat_lora.cli as cli

    def chatty(ns):
        logging.getLogger("somelib").warning("somelib is loading")
        raise ValueError("bad value 'x'; choose one of a, b")

    parser_func = cli.cmd_train
    try:
        cli.cmd_train = chatty
        assert main(["train", "--verbose", "--data", str(tmp_path / "x.csv")]) == 2
        verbose = capsys.readouterr().err.splitlines()
        assert main(["train", "--data", str(tmp_path / "x.csv")]) == 2
        quiet = capsys.readouterr().err.splitlines()
    finally:
        cli.cmd_train = parser_func
    assert verbose == ["WARNING somelib: somelib is loading", "goat train: error: bad value 'x'; choose one of a, b"]
    assert quiet == ["goat train: error: bad value 'x'; choose one of a, b"]


# ---- rows left out of the data ----------------------------------------------------------------------
def test_regression_rows_with_an_empty_label_are_counted_in_the_note_and_metrics(tiny, tmp_path, capsys):
    rows = pd.DataFrame({"text": [f"review number {i}" for i in range(40)], "label": [float(i % 5) for i in range(40)]})
    rows.loc[[3, 7], "label"] = float("nan")
    rows.loc[11, "label"] = None
    rows.to_csv(tmp_path / "scores.csv", index=False)
    with open(tmp_path / "scores.csv", "a") as fh:
        fh.write("an empty label cell,\n")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--task",
                "regression",
                "--model",
                tiny["bert"],
                "--data",
                str(tmp_path / "scores.csv"),
                "--output",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    where = str(tmp_path / "scores.csv")
    assert f"note: 4 row(s) of {where!r} left out: empty cells in 'label' (4)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dropped_rows"] == [{"source": where, "rows": 4, "why": "empty cells in 'label' (4)"}]
    assert metrics["data_note"] == f"4 row(s) of {where!r} left out: empty cells in 'label' (4)"


@pytest.mark.parametrize("family", ["classification", "regression", "qa", "causal-lm", "image-classification"])
def test_every_family_records_the_rows_it_leaves_out(family, tmp_path):
    from goat_lora.engine import resolve_run
    from goat_lora.settings import RunSettings

    n = 30
    frame = {
        "classification": {"text": [f"t{i}" for i in range(n)], "label": ["a", "b"] * (n // 2)},
        "regression": {"text": [f"t{i}" for i in range(n)], "label": [float(i) for i in range(n)]},
        "qa": {"question": [f"q{i}?" for i in range(n)], "answer": [f"answer {i}" for i in range(n)]},
        "causal-lm": {"text": [f"a text {i}" for i in range(n)]},
        "image-classification": {"image": [f"img{i}.png" for i in range(n)], "label": ["a", "b"] * (n // 2)},
    }[family]
    frame = pd.DataFrame(frame)
    column = {"causal-lm": "text", "qa": "answer"}.get(family, "label")
    frame[column] = frame[column].astype(object)
    frame.loc[[2, 5], column] = None
    if family == "image-classification":
        from test_task_image import write_image

        for name in frame["image"]:
            write_image(tmp_path / name, (200, 0, 0), seed=0)
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    extra = {"image_column": "image"} if family == "image-classification" else {}
    run = resolve_run(RunSettings(task=family, data=str(path), **extra))
    settings, task = run.settings, run.task
    data = task.load_data(settings)
    assert data.info["dropped_rows"] == [{"source": str(path), "rows": 2, "why": f"empty cells in {column!r} (2)"}] or (
        family == "causal-lm" and data.info["dropped_rows"][0]["rows"] == 2
    )
    assert len(data.train) + len(data.validation) + len(data.test) == n - 2


# ---- two runs, one --output ---------------------------------------------------------------------------
def test_two_runs_with_the_same_output_never_both_report_it(tiny, tmp_path):
    """Started together, each builds in its own staging folder; the one that finishes second is
    refused in one line (exit 2), and the folder holds the whole of the first run."""
    out = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "goat_lora.cli",
        "train",
        "--model",
        tiny["bert"],
        "--data",
        tiny["data"],
        "--output",
        str(out),
        *TINY[:-2],
        "--report-to",
        "tensorboard",
    ]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env("set"))
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    last = refused.replace("\r", "\n").strip().split("\n")[-1]  # after the run's own progress bar
    assert last.startswith("goat train: error: output") and "was written by another process while this one ran" in last
    winner = next(text for code, text, _ in results if code == 0)
    assert f"run folder: {out}" in winner
    for name in ("config.json", "metrics.json", "adapter", "tensorboard", "loss.png"):
        assert (out / name).exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left


def test_resume_finds_the_newest_staging_folder_of_a_run(tmp_path):
    from goat_lora.engine.checkpoints import RESUME_FILE, TRAINER_DIR, find_resumable

    out = tmp_path / "run"
    for age, name in enumerate([".run.aaaa.partial", ".run.bbbb.partial"]):
        folder = tmp_path / name / TRAINER_DIR
        (folder / "checkpoint-4").mkdir(parents=True)
        (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
        (folder / RESUME_FILE).write_text(json.dumps({"args": {}, "output": str(out), "step": age}))
        os.utime(tmp_path / name, (1_000_000 + age, 1_000_000 + age))
    state, staging, checkpoint, _ = find_resumable(str(out))
    assert Path(staging).name == ".run.bbbb.partial" and state["step"] == 1
    assert checkpoint.endswith("checkpoint-4")


# ---- Ctrl-C ---------------------------------------------------------------------------------------------
def test_interrupted_is_the_last_line_after_the_progress_bar(tiny, tmp_path):
    """Ctrl-C in the middle of training: the bar is closed first, so nothing is drawn after the message."""
    probe = textwrap.dedent(f"""
        import sys
        import goat_lora.engine.trainer as trainer
        calls = {{"n": 0}}
        real = trainer.GoatTrainer.training_step
        def training_step(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return real(self, *args, **kwargs)
        trainer.GoatTrainer.training_step = training_step
        from goat_lora.cli import main
        sys.exit(main(["train", "--model", {tiny["bert"]!r}, "--data", {tiny["data"]!r}, "--output",
                       {str(tmp_path / "run")!r}, *{TINY!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=_env("set"))
    assert result.returncode == 130, result.stderr
    last = result.stderr.replace("\r", "\n").rstrip("\n").split("\n")[-1]
    assert last == "goat train: interrupted", result.stderr[-500:]
    assert not (tmp_path / "run").exists()


def test_the_resume_state_keeps_the_settings_as_given(tiny, tmp_path, monkeypatch):
    """`goat train` checks its settings and data before the model loads, but what --resume rebuilds from
    is still the settings as the user gave them, before any default is filled in."""
    import goat_lora.engine.run as run

    saved = {}
    real = run.write_resume_state
    monkeypatch.setattr(
        run,
        "write_resume_state",
        lambda staging, requested, *a: (saved.update(requested), real(staging, requested, *a)),
    )
    argv = [
        "train",
        "--model",
        tiny["bert"],
        "--data",
        tiny["data"],
        "--output",
        str(tmp_path / "run"),
        *[flag for flag in TINY if flag not in ("--save-steps", "0")],
        "--save-steps",
        "100",
    ]
    assert main(argv) == 0
    assert saved["lr"] is None and saved["metric"] is None  # left for the method's and the task's defaults
