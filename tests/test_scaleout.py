"""Scale-out through `goat train`: torchrun / accelerate launch (DDP on CPU, gloo), FSDP2, DeepSpeed,
gradient checkpointing, bf16 and the TensorBoard / wandb reporters.

The distributed runs use a tiny random BERT classifier saved to disk with a word-level tokenizer
and a CSV whose texts all have the same number of tokens: with dynamic padding, ranks holding half
a batch would otherwise pad to other lengths, and padding tokens count in the balance loss (the
public code's default). Dropout is 0 everywhere and the data order sequential (--no-shuffle), so a
2-process run with batch 4 per process sees exactly the global batches of a 1-process run with
batch 8.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

from goat_lora.engine import Writing, resolve_run, train
from goat_lora.settings import RunSettings
from goat_lora.testing import save_word_bert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [
    "good",
    "bad",
    "great",
    "awful",
    "tasty",
    "stale",
    "fresh",
    "cheap",
    "love",
    "hate",
    "snack",
    "coffee",
    "tea",
    "box",
    "again",
    "never",
]


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """(model folder, csv path): tiny random BERT (no dropout) + word tokenizer, 60 six-word reviews."""
    root = tmp_path_factory.mktemp("scaleout")
    model_dir = save_word_bert(root / "bert", WORDS)
    return str(model_dir), write_reviews(root / "reviews.csv", lambda rng: 6)


def write_reviews(path, words_per_review, rows: int = 60, seed: int = 0) -> str:
    """A csv of `rows` seeded reviews of WORDS, pos / neg; `words_per_review(rng)` says how long each is."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for _ in range(rows):
            writer.writerow(
                [" ".join(rng.choice(WORDS) for _ in range(words_per_review(rng))), rng.choice(["pos", "neg"])]
            )
    return str(path)


def _flags(model_dir: str, data: str) -> list[str]:
    # 60 rows -> 12 test, 5 validation, 32 train: 4 full global batches of 8
    return [
        "--data",
        data,
        "--model",
        model_dir,
        "--train-size",
        "32",
        "--test-size",
        "8",
        "--rank",
        "4",
        "--experts",
        "2",
        "--top-k",
        "1",
        "--dropout",
        "0",
        "--no-shuffle",
        "--logging-steps",
        "1",
        "--epochs",
        "1",
        "--lr",
        "1e-2",
        "--save-steps",
        "0",
        "--max-length",
        "32",
    ]


def _args(model_dir: str, data: str, **overrides) -> RunSettings:
    args = RunSettings(
        data=data,
        model=model_dir,
        train_size=32,
        test_size=8,
        r=4,
        num_experts=2,
        top_k=1,
        dropout=0.0,
        shuffle=False,
        logging_steps=1,
        epochs=1,
        lr=1e-2,
        batch_size=8,
        save_steps=0,
        max_length=32,
    )
    return dataclasses.replace(args, **overrides)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(command: list[str], timeout: int = 120) -> None:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        OMP_WAIT_POLICY="PASSIVE",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
    )
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def _metrics(run: str) -> dict:
    with open(os.path.join(run, "metrics.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def one_process(tiny_task, tmp_path_factory):
    """The 1-process reference: global batch 8, default reporter (TensorBoard)."""
    model_dir, data = tiny_task
    out = str(tmp_path_factory.mktemp("one") / "run")
    train(_args(model_dir, data), out, writing=Writing(quiet=True))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_match_one_process(launcher, tiny_task, one_process, tmp_path):
    """torchrun / accelerate launch, 2 CPU processes x batch 4 (gloo DDP) = 1 process x batch 8: the
    per-step training losses within 1e-5, and the logged balance loss, expert balance and expert
    load (summed over processes) equal the single-process ones."""
    model_dir, data = tiny_task
    out = str(tmp_path / "run")
    cli = ["-m", "goat_lora.cli", "train", *_flags(model_dir, data), "--batch-size", "4", "--output", out]
    if launcher == "torchrun":
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            *cli,
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            os.path.join(REPO, "configs", "accelerate_ddp_cpu.yaml"),
            "--num_processes",
            "2",
            "--main_process_port",
            str(_free_port()),
            *cli,
        ]
    _launch(command)
    one, two = _metrics(one_process), _metrics(out)
    assert two["steps"] == one["steps"] == 4  # 32 examples / global batch 8: the data was sharded
    assert (one["distributed"], one["processes"]) == ("NO", 1)
    assert (two["distributed"], two["processes"]) == ("MULTI_CPU", 2)
    for a, b in zip(one["train_loss"], two["train_loss"], strict=True):
        assert a["step"] == b["step"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
        assert abs(a["aux_loss"] - b["aux_loss"]) <= 1e-4 + 1e-9, (a, b)  # logged to 4 decimals
        assert abs(a["expert_balance"] - b["expert_balance"]) <= 1e-4 + 1e-9, (a, b)
    for epoch_one, epoch_two in zip(one["expert_load_per_epoch"], two["expert_load_per_epoch"], strict=True):
        for name, load in epoch_one.items():
            assert epoch_two[name] == pytest.approx(load, abs=1e-12), name
    for name, load in one["expert_load"].items():  # test set: both ranks evaluate it all, counts are summed
        assert two["expert_load"][name] == pytest.approx(load, abs=1e-12)
    # rank 0 alone wrote the run folder and the TensorBoard events
    assert len(glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))) == 1
    assert not glob.glob(os.path.join(os.path.dirname(out), ".*.partial"))


def test_tensorboard_events_in_the_run_folder_by_default(one_process):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(one_process, "tensorboard", "events.out.tfevents.*"))
    assert len(files) == 1
    events = EventAccumulator(os.path.dirname(files[0]))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/aux_loss", "train/expert_balance"} <= set(tags)
    assert len(events.Scalars("train/loss")) == 4
    assert not os.path.exists(os.path.join(one_process, ".trainer"))


def test_report_to_wandb_without_wandb_is_one_line_error(tiny_task, tmp_path, capsys):
    import importlib.util

    from goat_lora.cli import main
    from goat_lora.scaleout import parse_report_to

    if importlib.util.find_spec("wandb") is not None:
        assert parse_report_to("wandb") == ["wandb"]
        pytest.skip("wandb is installed here; the error path needs it absent")
    out = tmp_path / "run"
    code = main(["train", *_flags(*tiny_task), "--report-to", "wandb", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "wandb is not installed" in err, err
    assert not out.exists()
    assert parse_report_to("none") == [] and parse_report_to("tensorboard") == ["tensorboard"]


def test_report_to_wandb_when_installed(tiny_task, tmp_path, monkeypatch):
    """--report-to tensorboard,wandb (offline mode, no account): both write their files."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    out = str(tmp_path / "run")
    train(_args(*tiny_task, report_to="tensorboard,wandb"), out, writing=Writing(quiet=True))
    assert glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "*.wandb"))
    assert glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))


def test_bf16_trains_with_float32_adapters(tiny_task, one_process, tmp_path):
    """--bf16 on the CPU: bfloat16 autocast (the losses move off the float32 run's by bf16 rounding),
    while lora_A / lora_B / routers / head stay float32, in the model and in the saved adapter."""
    import safetensors.torch

    model_dir, data = tiny_task
    out = str(tmp_path / "run")
    metrics = train(_args(model_dir, data, bf16=True, report_to="none"), out, writing=Writing(quiet=True))
    reference = _metrics(one_process)["train_loss"]
    losses = [h["loss"] for h in metrics["train_loss"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    gaps = [abs(a - b["loss"]) for a, b in zip(losses, reference)]
    assert max(gaps) > 1e-5, "no difference from float32: autocast did not run"
    assert max(gaps) < 0.05
    saved = safetensors.torch.load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    adapters = {k: v for k, v in saved.items() if not k.endswith("base_fingerprint")}  # float64 statistics
    assert any(k.endswith("lora_A") for k in adapters) and any(k.endswith("router.weight") for k in adapters)
    assert all(v.dtype == torch.float32 for v in adapters.values()), {k: v.dtype for k, v in adapters.items()}


# ---- gradient checkpointing through the training path ---------------------------------------


def _router_grads_of_one_step(monkeypatch, model_dir, data, out, **overrides):
    """Router gradients of the first optimisation step of `train()` (taken just before the optimiser
    step) and whether the base model ran with activation checkpointing."""
    import goat_lora.engine.run as train_module

    seen: dict = {}

    class Capture(train_module.ExpertLoadCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if not seen:
                base = self.model.base_model
                seen["checkpointing"] = bool(
                    getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
                )
                seen["grads"] = {n: l.router.weight.grad.clone() for n, l in self.model.named_goat_layers()}

    monkeypatch.setattr(train_module, "ExpertLoadCallback", Capture)
    args = _args(model_dir, data, train_size=8, report_to="none", eval_each_epoch=False, **overrides)
    args = dataclasses.replace(args, warmup_ratio=0.0)
    train(args, out, writing=Writing(quiet=True, save_weights=False, plots=False))
    return seen


def test_gradient_checkpointing_keeps_the_balance_loss_reaching_the_routers(tiny_task, tmp_path, monkeypatch):
    model_dir, data = tiny_task
    run = lambda name, **kw: _router_grads_of_one_step(monkeypatch, model_dir, data, str(tmp_path / name), **kw)  # noqa: E731
    plain = run("plain", aux_loss_coef=1.0)
    checkpointed = run("ckpt", aux_loss_coef=1.0, gradient_checkpointing=True)
    without_aux = run("noaux", aux_loss_coef=0.0, gradient_checkpointing=True)
    assert checkpointed["checkpointing"] and not plain["checkpointing"]
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(checkpointed["grads"][name], grad, atol=1e-7, rtol=1e-5)
    # the balance loss is what moves them: with coefficient 0 the router gradients differ
    gap = max(float((checkpointed["grads"][n] - without_aux["grads"][n]).abs().max()) for n in plain["grads"])
    assert gap > 1e-4


def test_reentrant_checkpointing_cannot_be_asked_for():
    from goat_lora.scaleout import training_kwargs

    kwargs = training_kwargs(RunSettings(gradient_checkpointing=True))
    key = next(k for k in kwargs if k.endswith("checkpointing_kwargs"))
    assert kwargs[key] == {"use_reentrant": False}


# ---- FSDP -------------------------------------------------------------------------------------


def _fsdp_base():
    from goat_lora.testing import tiny_llama

    return tiny_llama(intermediate_size=48, max_position_embeddings=2048, pad_token_id=None).train()


def _fsdp_model():
    from goat_lora import GoatConfig, get_goat_model

    return get_goat_model(_fsdp_base(), GoatConfig(r=4, num_experts=2, top_k=1, dropout=0.0))


def _fsdp_losses(model, ids: torch.Tensor, steps: int = 3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + 1e-2 * model.aux_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _fsdp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from goat_lora.layer import GoatLayer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _fsdp_model()
    for module in model.modules():
        if isinstance(module, GoatLayer):
            fully_shard(module)
    fully_shard(model)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(3)).chunk(2)[rank]
    losses = _fsdp_losses(model, ids)
    total = torch.tensor(losses)
    dist.all_reduce(total)  # the global loss: mean over the two halves (equal token counts)
    from goat_lora.scaleout import gather_full_parameters

    gather_full_parameters(model)  # what goat train does before rank 0 saves the adapter
    if rank == 0:
        torch.save({"losses": (total / 2).tolist()}, os.path.join(out_dir, "fsdp.pt"))
        model.save_pretrained(os.path.join(out_dir, "adapter"))
    dist.barrier()
    os._exit(0)  # no gloo teardown: it can abort when the other rank has already closed (test_distributed.py)


@pytest.mark.slow
def test_fsdp2_on_cpu_matches_one_process(tmp_path):
    """FSDP2 (fully_shard per GoatLayer and the root), 2 CPU processes over gloo: losses of three
    AdamW steps equal one process on the whole batch (the balance loss is all-reduced)."""
    import torch.multiprocessing as mp

    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("torch without FSDP2 (fully_shard)")
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    from goat_lora import GoatModel

    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(3))
    model = _fsdp_model()
    reference = _fsdp_losses(model, ids)
    got = torch.load(tmp_path / "fsdp.pt")["losses"]
    assert got == pytest.approx(reference, abs=1e-5)
    # the adapter saved from the sharded model (full tensors gathered) = the 1-process trained one
    reloaded = GoatModel.from_pretrained(_fsdp_base(), str(tmp_path / "adapter")).trainable_state_dict()
    for name, value in model.trainable_state_dict().items():
        torch.testing.assert_close(reloaded[name], value, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=(
        "GPU only: accelerate turns FSDP on only for accelerator device types (MULTI_GPU, XPU, "
        "NPU...); a CPU-only run is MULTI_CPU and accelerate ignores ACCELERATE_USE_FSDP there (plain DDP). "
        "FSDP2 itself runs on CPU in test_fsdp2_on_cpu_matches_one_process"
    ),
)
def test_fsdp_config_through_accelerate_launch(tiny_task, tmp_path):
    """configs/accelerate_fsdp.yaml through accelerate launch and the Trainer, on 1 or 2 GPUs."""
    model_dir, data = tiny_task
    out = str(tmp_path / "run")
    processes = min(2, torch.cuda.device_count())
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(REPO, "configs", "accelerate_fsdp.yaml"),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(_free_port()),
        "-m",
        "goat_lora.cli",
        "train",
        *_flags(model_dir, data),
        "--batch-size",
        "4",
        "--report-to",
        "none",
        "--output",
        out,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = _metrics(out)
    assert metrics["steps"] == 32 // (4 * processes)
    assert (metrics["distributed"], metrics["processes"]) == ("FSDP", processes)
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in metrics["train_loss"]])))


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.skipif(
    not (torch.cuda.is_available() and _has_deepspeed()),
    reason=(
        "GPU only: DeepSpeed ZeRO-2 needs CUDA (its fused optimizers and NCCL collectives) and the "
        "deepspeed package, which is not installed on the CPU machines"
    ),
)
def test_deepspeed_zero2_config(tiny_task, tmp_path):
    model_dir, data = tiny_task
    out = str(tmp_path / "run")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        str(_free_port()),
        "-m",
        "goat_lora.cli",
        "train",
        *_flags(model_dir, data),
        "--batch-size",
        "8",
        "--report-to",
        "none",
        "--deepspeed",
        os.path.join(REPO, "configs", "ds_zero2.json"),
        "--output",
        out,
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _metrics(out)["steps"] == 4 and _metrics(out)["distributed"] == "DEEPSPEED"


def test_deepspeed_flag_checks_its_config_and_package(tiny_task, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_run(RunSettings(deepspeed=str(tmp_path / "missing.json")))
    if not _has_deepspeed():
        with pytest.raises(ValueError, match="deepspeed is not installed"):
            resolve_run(RunSettings(deepspeed=os.path.join(REPO, "configs", "ds_zero2.json")))


def test_shipped_configs_parse():
    import yaml

    for name in ("accelerate_ddp_cpu.yaml", "accelerate_fsdp.yaml"):
        with open(os.path.join(REPO, "configs", name)) as fh:
            config = yaml.safe_load(fh)
        assert config["num_processes"] == 2 and config["use_cpu"] is False
    with open(os.path.join(REPO, "configs", "accelerate_fsdp.yaml")) as fh:
        fsdp = yaml.safe_load(fh)["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "GoatLayer"
    with open(os.path.join(REPO, "configs", "ds_zero2.json")) as fh:
        assert json.load(fh)["zero_optimization"]["stage"] == 2
