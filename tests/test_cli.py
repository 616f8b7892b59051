"""The command line: bad input -> one line on stderr, exit code 2, no traceback, no run folder;
subcommands and help."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from goat_lora.cli import build_parser, main

TINY = ["--max-length", "16", "--epochs", "1", "--test-size", "8", "--train-size", "16"]


def _csv(tmp_path, rows, name="d.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


BAD_INPUTS = {
    "missing-file": (lambda t: ["--data", str(t / "nope.csv")], "does not exist"),
    "missing-column": (
        lambda t: ["--data", _csv(t, {"review": ["a", "b"], "label": [0, 1]})],
        "no column 'text' (--text-column)",
    ),
    "empty-data": (lambda t: ["--data", _csv(t, {"text": [], "label": []})], "no rows"),
    "single-class": (
        lambda t: ["--data", _csv(t, {"text": ["a", "b", "c"], "label": ["x", "x", "x"]})],
        "single class",
    ),
    "unknown-method": (lambda t: ["--method", "gaot"], "unknown method 'gaot'"),
    "bad-model-path": (
        lambda t: ["--model", str(t / "no-model"), "--data", _csv(t, {"text": list("abcdef"), "label": [0, 1] * 3})],
        "does not exist; --model takes a local folder",
    ),
    "bad-rank": (lambda t: ["--rank", "6", "--experts", "4"], "divisible"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_no_folder(case, tmp_path, capsys):
    make_args, message = BAD_INPUTS[case]
    out = tmp_path / "run"
    code = main(["train", *make_args(tmp_path), "--output", str(out), *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert err.startswith("goat train: error:")
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".run", "run"))]


def test_argparse_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--rank", "eight"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid int value" in err


def test_existing_output_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("x")
    assert main(["train", "--output", str(tmp_path / "run"), *TINY]) == 2
    assert "already exists" in capsys.readouterr().err


def test_subcommands_and_help():
    parser = build_parser([])
    text = parser.format_help()
    for name in ("train", "eval", "compare", "bench", "inspect"):
        assert name in text
    train_help = build_parser(["train"])._subparsers._group_actions[0].choices["train"].format_help()
    for flag in (
        "--rank",
        "--experts",
        "--top-k",
        "--lr",
        "--epochs",
        "--batch-size",
        "--max-length",
        "--train-size",
        "--seed",
    ):
        assert flag in train_help


@pytest.mark.parametrize("offline", ["set", "unset"])
def test_console_script_exit_code(tmp_path, offline):
    """The installed entry point, in a fresh process, with HF_HUB_OFFLINE set (as on offline clusters,
    where libraries print notes at import) and unset: exit code 2 and one line, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if offline == "set":
        env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "goat_lora.cli", "train", "--data", str(tmp_path / "missing.csv")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr, result.stderr


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_openmp_wait_policy_is_set_before_torch_loads(preset):
    """`import goat_lora` does not load torch, so the command line can make idle OpenMP threads sleep
    (OMP_WAIT_POLICY=PASSIVE) before torch's OpenMP runtime reads the variable; a user's value wins."""
    probe = (
        "import os, sys\n"
        "import goat_lora, goat_lora.cli as cli\n"
        "assert 'torch' not in sys.modules, 'importing goat_lora loaded torch'\n"
        "cli._prefer_passive_openmp()\n"
        "import torch\n"
        "print(os.environ['OMP_WAIT_POLICY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (preset or "PASSIVE")


def test_package_exports_match_all():
    """Every name in goat_lora.__all__ resolves (lazily) and the lazy table names nothing else."""
    import goat_lora

    assert set(goat_lora._EXPORTS) | {"__version__"} == set(goat_lora.__all__)
    for name in goat_lora.__all__:
        assert getattr(goat_lora, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        goat_lora.nope  # noqa: B018


def test_inspect_an_image_model(tmp_path, capsys):
    """goat inspect takes any checkpoint: here a tiny ViT image classifier (not a text classifier)."""
    from goat_lora.testing import tiny_vit

    tiny_vit(layers=1, heads=4, num_labels=3).save_pretrained(tmp_path / "vit")
    assert main(["inspect", "--model", str(tmp_path / "vit"), "--rank", "4", "--experts", "2"]) == 0
    out = capsys.readouterr().out
    assert "vit.layers.0.attention.q_proj" in out and "6 layers" in out and "classifier" not in out.split("layers;")[0]
