"""Decoders: `goat train --task causal-lm` (tasks/causal_lm.py), labels and prompt masking,
generate(), greedy generations that survive save -> reload onto a fresh base, and `goat eval` of a
causal-lm run.

Fast tests use a tiny random LLaMA saved to disk with a small byte-level BPE tokenizer trained on
the shipped instruction set; one slow test runs the shipped SmolLM2-135M itself.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from goat_lora.engine import load_run
from goat_lora.tasks.causal_lm import CausalLMCollator, instructions_path, read_texts
from goat_lora.tasks.decoders import generate_greedy
from goat_lora.testing import save_tiny_decoder


def generate_text(model, tokenizer, prompts, max_new_tokens=24):
    return generate_greedy(model, tokenizer, prompts, max_new_tokens)


def item(text, prompt):
    return {"input": {"text": text, "prompt": prompt}, "labels": None}


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> str:
    """A folder with a tiny random LlamaForCausalLM (2 layers, hidden 32) and a 300-token BPE tokenizer."""
    return save_tiny_decoder(tmp_path_factory.mktemp("decoder") / "tiny-llama")


@pytest.fixture(scope="module")
def tiny_run(tiny_decoder, tmp_path_factory) -> str:
    from goat_lora.cli import main

    out = tmp_path_factory.mktemp("runs") / "causal"
    code = main(
        [
            "train",
            "--task",
            "causal-lm",
            "--model",
            tiny_decoder,
            "--data",
            "instructions",
            "--mask-prompt",
            "--train-size",
            "48",
            "--test-size",
            "6",
            "--max-length",
            "48",
            "--batch-size",
            "8",
            "--rank",
            "4",
            "--experts",
            "2",
            "--top-k",
            "1",
            "--lr",
            "1e-2",
            "--epochs",
            "2",
            "--logging-steps",
            "1",
            "--save-steps",
            "0",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    return str(out)


def test_goat_train_causal_lm_writes_a_run(tiny_run):
    with open(os.path.join(tiny_run, "metrics.json")) as fh:
        metrics = json.load(fh)
    assert metrics["task"] == "causal-lm" and metrics["method"] == "goat"
    losses = [h["loss"] for h in metrics["train_loss"]]
    assert len(losses) == metrics["steps"] == 12  # 48 examples / batch 8 x 2 epochs
    assert metrics["metric"] == "perplexity" and "validation_perplexity" in metrics["per_epoch_eval"][0]
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns
    assert all(h["aux_loss"] > 0 for h in metrics["train_loss"])  # the balance loss joined the task loss
    assert metrics["test_loss"] > 0 and metrics["test_perplexity"] == pytest.approx(
        2.718281828 ** metrics["test_loss"], rel=1e-6
    )
    assert len(metrics["samples"]) == 3 and all(s["prompt"].endswith("### Response:\n") for s in metrics["samples"])
    for name in ("config.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert os.path.isfile(os.path.join(tiny_run, name)), name
    assert os.listdir(os.path.join(tiny_run, "tensorboard"))


def test_goat_train_fills_no_kv_cache_while_training(tiny_decoder, tmp_path, monkeypatch):
    """Every training forward of `goat train` on a decoder returns no KV cache: transformers' Trainer sets the
    model's use_cache to TrainingArguments.use_cache (False) when it is built. Compiled regionally, a cache
    would recompile the block once per layer (test_compile.py); generation keeps its cache
    (generation_config.use_cache)."""
    from goat_lora.cli import main
    from goat_lora.engine import trainer

    outputs = []
    compute_loss = trainer.GoatTrainer.compute_loss

    def spy(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, out = compute_loss(self, model, inputs, True, num_items_in_batch)
        outputs.append(set(out.keys()))
        return (loss, out) if return_outputs else loss

    monkeypatch.setattr(trainer.GoatTrainer, "compute_loss", spy)
    argv = ["train", "--task", "causal-lm", "--model", tiny_decoder, "--data", "instructions", "--train-size", "16"]
    argv += ["--test-size", "4", "--max-length", "32", "--batch-size", "8", "--epochs", "1", "--save-steps", "0"]
    assert main([*argv, "--report-to", "none", "--output", str(tmp_path / "run")]) == 0
    assert outputs and all("cache" not in keys and "logits" in keys for keys in outputs)


def test_reloaded_adapter_generates_the_same_tokens(tiny_run):
    """The trained model's greedy samples (in metrics.json) = the adapter reloaded onto a fresh base."""
    with open(os.path.join(tiny_run, "metrics.json")) as fh:
        samples = json.load(fh)["samples"]
    model, parts, _ = load_run(tiny_run)
    tokenizer = parts.tokenizer
    again = generate_text(model, tokenizer, [s["prompt"] for s in samples])
    assert [s["token_ids"] for s in again] == [s["token_ids"] for s in samples]
    assert any(len(s["token_ids"]) > 0 for s in again)
    # and the adapter matters: the base alone continues differently
    base = model.unload()
    plain = generate_text(base, tokenizer, [s["prompt"] for s in samples])
    assert [s["token_ids"] for s in plain] != [s["token_ids"] for s in samples]


def test_goat_eval_reproduces_a_causal_run(tiny_run, tmp_path):
    from goat_lora.cli import main

    with open(os.path.join(tiny_run, "metrics.json")) as fh:
        metrics = json.load(fh)
    assert main(["eval", "--adapter", tiny_run, "--output", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["test_loss"] == pytest.approx(metrics["test_loss"], abs=1e-9)
    assert again["test_perplexity"] == pytest.approx(metrics["test_perplexity"], rel=1e-9)
    assert [s["token_ids"] for s in again["samples"]] == [s["token_ids"] for s in metrics["samples"]]


def test_goat_compare_runs_causal_lm_selecting_by_perplexity(tiny_decoder, tmp_path):
    from goat_lora.cli import main

    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--task",
                "causal-lm",
                "--model",
                tiny_decoder,
                "--methods",
                "goat",
                "lora",
                "--seeds",
                "1",
                "--lrs",
                "1e-3",
                "1e-2",
                "--train-size",
                "16",
                "--test-size",
                "4",
                "--max-length",
                "32",
                "--rank",
                "4",
                "--experts",
                "2",
                "--report-to",
                "none",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["metric"] == "perplexity" and report["settings"]["lower_is_better"] is True
    for label, summary in report["methods"].items():
        for chosen in summary["per_seed"]:  # each seed keeps the rate with the lower validation perplexity
            runs = [r for r in report["runs"] if r["label"] == label and r["seed"] == chosen["seed"]]
            assert len(runs) == 2 and chosen["validation"] == min(r["validation"] for r in runs)
            assert chosen["lr"] == min(runs, key=lambda r: r["validation"])["lr"]


def test_collator_labels_mask_padding_and_prompt(tiny_decoder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder)
    items = [
        item("### Instruction:\nSay hi\n### Response:\nhi", "### Instruction:\nSay hi\n### Response:\n"),
        item("a longer text without any prompt at all", None),
    ]
    plain = CausalLMCollator(tokenizer, 64)(items)
    masked = CausalLMCollator(tokenizer, 64, mask_prompt=True)(items)
    ids, attention, labels = masked["input_ids"], masked["attention_mask"], masked["labels"]
    lengths = attention.sum(1)
    for row in range(2):
        n = int(lengths[row])
        assert ids[row, n - 1] == tokenizer.eos_token_id  # every text ends with EOS
        assert (labels[row, n:] == -100).all() and (ids[row, n:] == tokenizer.pad_token_id).all()
        assert (plain["labels"][row, :n] == plain["input_ids"][row, :n]).all()
    prompt_len = len(tokenizer(items[0]["input"]["prompt"])["input_ids"])
    assert (labels[0, :prompt_len] == -100).all()
    assert (labels[0, prompt_len : int(lengths[0])] == ids[0, prompt_len : int(lengths[0])]).all()
    assert tokenizer.decode(ids[0, prompt_len : int(lengths[0]) - 1]) == "hi"
    assert (labels[1, : int(lengths[1])] == ids[1, : int(lengths[1])]).all()  # no prompt: nothing masked
    truncated = CausalLMCollator(tokenizer, 5)(items)
    assert truncated["input_ids"].shape[1] == 5


def test_user_jsonl_with_a_text_column(tmp_path, tiny_decoder, capsys):
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"body": f"note number {i} says hello"}) + "\n" for i in range(20)))
    texts = read_texts(str(path), "body", str(path))
    assert len(texts) == 20 and all(x["prompt"] is None for x in texts.inputs)
    from goat_lora.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--task",
            "causal-lm",
            "--model",
            tiny_decoder,
            "--data",
            str(path),
            "--text-column",
            "body",
            "--max-length",
            "16",
            "--rank",
            "4",
            "--experts",
            "2",
            "--report-to",
            "none",
            "--save-steps",
            "0",
            "--output",
            str(out),
        ]
    )
    assert code == 0 and (out / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    code = main(
        ["train", "--task", "causal-lm", "--model", tiny_decoder, "--data", str(path), "--output", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no column 'text' (--text-column)" in err[0]


def test_rows_with_a_response_field_carry_their_prompt(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"text": "Q: a\nA: b", "response": "b"})
        + "\n"
        + json.dumps({"text": "plain", "response": None})
        + "\n"
    )
    split = read_texts(str(path), "text", str(path))
    assert split[0]["input"] == {"text": "Q: a\nA: b", "prompt": "Q: a\nA: "} and split[1]["input"]["prompt"] is None


@pytest.mark.slow
def test_smollm2_trains_generates_and_reloads():
    """The shipped SmolLM2-135M (LLaMA architecture, 211 Linear layers): GOAT on every Linear but the
    head, two AdamW steps on the causal LM loss plus the balance loss, greedy generate() on the
    adapted model, then save -> reload onto a fresh copy of the base -> the same tokens."""
    from goat_lora import GoatConfig, GoatModel, get_goat_model
    from goat_lora.hf import load_causal_lm, load_tokenizer

    try:
        base = load_causal_lm("smollm2")
        tokenizer = load_tokenizer("smollm2")
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 is not installed: {err}")
    fresh = copy.deepcopy(base)  # the untouched pretrained model, for the reload
    model = get_goat_model(base, GoatConfig(r=8, num_experts=4, top_k=2, dropout=0.0, seed=0))
    assert len(model.goat_layer_names) == 210  # every Linear but lm_head
    texts = read_texts(instructions_path(), "text", "instructions")
    batch = CausalLMCollator(tokenizer, 32, mask_prompt=True)([texts[i] for i in range(4)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(**batch).loss + model.goat_config.aux_loss_coef * model.aux_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    prompt = ["### Instruction:\nWhat is 2 plus 3?\n### Response:\n"]
    before = generate_text(model, tokenizer, prompt, max_new_tokens=8)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = GoatModel.from_pretrained(fresh, folder)
    after = generate_text(reloaded, tokenizer, prompt, max_new_tokens=8)
    assert after[0]["token_ids"] == before[0]["token_ids"] and len(before[0]["token_ids"]) > 0


@pytest.fixture(scope="module")
def tied_decoder(tmp_path_factory) -> str:
    """The tiny decoder with its output layer tied to the input embeddings, as SmolLM2's."""
    from transformers import LlamaForCausalLM

    folder = save_tiny_decoder(tmp_path_factory.mktemp("decoder") / "tied-llama")
    model = LlamaForCausalLM.from_pretrained(folder)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("embeddings", ["untied", "tied"])
def test_sigkill_after_a_checkpoint_then_resume_matches_the_uninterrupted_causal_lm_run(
    embeddings, tiny_decoder, tied_decoder, tmp_path, monkeypatch
):
    """As tests/test_resume.py for classification: 2 epochs x 6 steps, a checkpoint every 4 steps, the
    process SIGKILLed after step 7; `goat train --resume` runs only the remaining 8 steps and ends
    with the losses and test loss of a run that was never interrupted. Tied embeddings (one tensor
    under two names, which safetensors refuses to write twice) checkpoint and resume too."""
    from conftest import run_until_stalled_then_kill

    import goat_lora.engine.trainer
    from goat_lora.cli import main

    decoder = tied_decoder if embeddings == "tied" else tiny_decoder
    run = [
        "train",
        "--task",
        "causal-lm",
        "--model",
        decoder,
        "--data",
        "instructions",
        "--mask-prompt",
        "--train-size",
        "24",
        "--test-size",
        "6",
        "--max-length",
        "32",
        "--batch-size",
        "4",
        "--rank",
        "4",
        "--experts",
        "2",
        "--top-k",
        "1",
        "--lr",
        "1e-2",
        "--epochs",
        "2",
        "--logging-steps",
        "1",
        "--seed",
        "3",
        "--save-steps",
        "4",
    ]
    assert main([*run, "--output", str(tmp_path / "reference")]) == 0
    reference = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert reference["steps"] == 12

    out, marker = tmp_path / "run", tmp_path / "stalled"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STALL_AT": "7", "STALL_MARKER": str(marker)}
    run_until_stalled_then_kill([*run, "--output", str(out)], env, marker)
    [staging] = tmp_path.glob(".run.*.partial")  # the run's own staging folder
    assert not out.exists() and (staging / ".trainer" / "checkpoint-4" / "trainer_state.json").is_file()

    steps_run = []
    training_step = goat_lora.engine.trainer.GoatTrainer.training_step
    monkeypatch.setattr(
        goat_lora.engine.trainer.GoatTrainer,
        "training_step",
        lambda self, *a, **k: steps_run.append(1) or training_step(self, *a, **k),
    )
    assert main(["train", "--resume", str(out)]) == 0
    assert len(steps_run) == 12 - 4
    resumed = json.loads((out / "metrics.json").read_text())
    assert not staging.exists() and not (out / ".trainer").exists()
    assert resumed["steps"] == reference["steps"]
    assert resumed["test_loss"] == pytest.approx(reference["test_loss"], abs=1e-6)
    for a, b in zip(resumed["train_loss"], reference["train_loss"], strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_decoder_checkpoint_trains_in_float32(dtype, tmp_path):
    """transformers 5 loads a checkpoint in its own dtype; training bf16 / fp16 weights without autocast or
    loss scaling is unsafe, so every decoder family loads float32 (--bf16 autocasts instead)."""
    from transformers import LlamaForCausalLM

    from goat_lora.cli import main

    folder = save_tiny_decoder(tmp_path / "half")
    LlamaForCausalLM.from_pretrained(folder).to(dtype).save_pretrained(folder)
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--task",
                "causal-lm",
                "--model",
                folder,
                "--train-size",
                "8",
                "--test-size",
                "4",
                "--max-length",
                "32",
                "--batch-size",
                "4",
                "--rank",
                "4",
                "--experts",
                "2",
                "--top-k",
                "1",
                "--save-steps",
                "0",
                "--report-to",
                "none",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    model = load_run(str(out))[0]
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.slow
def test_the_shipped_smollm2_is_converted_once_to_the_same_floats(tmp_path, monkeypatch):
    """The first load of "smollm2" writes the dequantised GGUF as a transformers folder under the cache;
    loading that folder gives the GGUF load's exact weights and tokenizer, and later loads never convert
    again. An unwritable cache falls back to the GGUF file, leaving no half-written folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from goat_lora import hf

    try:
        folder, gguf_file = hf.smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 is not installed: {err}")
    monkeypatch.setenv("GOAT_LORA_CACHE", str(tmp_path / "cache"))
    path, extra = hf.resolve_model("smollm2")
    assert extra == {} and os.path.dirname(path) == str(tmp_path / "cache")
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(path)]  # no partial folder left
    with open(os.path.join(path, "config.json")) as handle:
        assert "quantization_config" not in json.load(handle)  # else the Trainer refuses it as "purely quantized"
    cached, direct = hf.load_causal_lm("smollm2"), AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    assert not getattr(cached, "is_quantized", False) and getattr(cached, "hf_quantizer", None) is None
    direct_state = direct.state_dict()
    assert cached.state_dict().keys() == direct_state.keys()
    assert all(torch.equal(value, direct_state[name]) for name, value in cached.state_dict().items())
    texts = ["What is the capital of Peru?", "### Instruction:\nWhat is 2 plus 3?\n### Response:\n"]
    cached_tokenizer = hf.load_tokenizer("smollm2")
    direct_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    assert cached_tokenizer(texts)["input_ids"] == direct_tokenizer(texts)["input_ids"]
    assert cached_tokenizer.eos_token == direct_tokenizer.eos_token
    assert cached_tokenizer.chat_template == direct_tokenizer.chat_template

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(hf, "_convert_gguf", no_conversion)
    assert hf.resolve_model("smollm2") == (path, {})
    monkeypatch.undo()
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("GOAT_LORA_CACHE", str(blocked / "cache"))
    assert hf.resolve_model("smollm2") == (folder, {"gguf_file": gguf_file})
