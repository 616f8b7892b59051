"""Scale-out and ecosystem knobs of `goat train`, kept apart from the training loop in train.py.

    --no-shuffle              sequential data order (accelerate then gives rank r every other batch,
                              so a 2-process run sees the same global batches as a 1-process one)
    --gradient-checkpointing  transformers' activation checkpointing, always use_reentrant=False
                              (reentrant checkpointing would cut the load-balancing loss off the routers)
    --bf16                    bfloat16 autocast (CPU or GPU); adapters, routers and optimiser state
                              stay float32 (GoatLayer keeps its parameters float32 whatever runs around it)
    --deepspeed FILE          a DeepSpeed config (configs/ds_zero2.json); needs CUDA and `deepspeed`
    --report-to LIST          tensorboard (default; event files in RUN/tensorboard), wandb, none

FSDP comes from the launcher (`accelerate launch --config_file configs/accelerate_fsdp.yaml`), which
sets the environment the transformers Trainer reads. docs/scaling.md has the commands.
"""

from __future__ import annotations

import importlib.util
import os

REPORTERS = ("tensorboard", "wandb", "none")
TENSORBOARD_DIR = "tensorboard"  # inside the run folder


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """'tensorboard,wandb' -> ['tensorboard', 'wandb']; 'none' or '' -> []. Unknown names, or a
    reporter whose package is not installed, raise ValueError with one line."""
    if value is None:
        return []
    names = value if isinstance(value, list) else [v.strip() for v in str(value).split(",")]
    names = [n.lower() for n in names if n]
    for name in names:
        if name not in REPORTERS:
            raise ValueError(f"--report-to {name!r} is not supported; choose from {', '.join(REPORTERS)}")
    if "none" in names:
        if len(names) > 1:
            raise ValueError("--report-to none cannot be combined with other reporters")
        return []
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            "--report-to wandb: wandb is not installed (pip install wandb), or use --report-to tensorboard"
        )
    if "tensorboard" in names and not _tensorboard_available():
        raise ValueError("--report-to tensorboard: tensorboard is not installed (pip install tensorboard)")
    return names


def _tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def validate(args) -> None:
    """Checks of the scale-out fields of the run's settings (called when they are resolved)."""
    parse_report_to(getattr(args, "report_to", "tensorboard"))
    deepspeed = getattr(args, "deepspeed", None)
    quantize = getattr(args, "quantize", None)
    if quantize and (deepspeed or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")):
        raise ValueError(
            f"--quantize {quantize} runs with one process or DDP; sharding a bitsandbytes base "
            f"({'DeepSpeed' if deepspeed else 'FSDP'}) is not supported here"
        )
    if deepspeed:
        if not os.path.isfile(deepspeed):
            raise FileNotFoundError(f"--deepspeed config {deepspeed!r} does not exist")
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError("--deepspeed: deepspeed is not installed (pip install deepspeed; it needs CUDA)")


def training_kwargs(args) -> dict:
    """Extra transformers.TrainingArguments for the scale-out fields of the settings (report_to
    excludes tensorboard: `callbacks` adds it with its folder inside the run folder)."""
    import torch
    from transformers import TrainingArguments

    kwargs: dict = {
        "report_to": [n for n in parse_report_to(getattr(args, "report_to", "tensorboard")) if n != "tensorboard"]
        or "none"
    }
    mps = getattr(torch.backends, "mps", None)
    if not torch.cuda.is_available() and not (mps is not None and mps.is_available()):
        # CPU only: without use_cpu the Trainer neither shards data nor wraps DDP under torchrun
        # (parallel_mode stays NOT_PARALLEL), and it refuses bf16
        kwargs["use_cpu"] = True
    if getattr(args, "bf16", False):
        kwargs["bf16"] = True
    if getattr(args, "gradient_checkpointing", False):
        fields = TrainingArguments.__dataclass_fields__
        name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        kwargs[name] = True
        kwargs[f"{name}_kwargs"] = {"use_reentrant": False}
    if getattr(args, "deepspeed", None):
        kwargs["deepspeed"] = args.deepspeed
    return kwargs


def callbacks(args, run_folder: str) -> list:
    """Trainer callbacks for the reporters handled here: TensorBoard writing to RUN/tensorboard
    (only the main process writes; the callback checks it)."""
    if "tensorboard" not in parse_report_to(getattr(args, "report_to", "tensorboard")):
        return []
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = os.path.join(run_folder, TENSORBOARD_DIR)
    return [callback]


def train_sampler(trainer):
    """A SequentialSampler when the run asked for --no-shuffle, else None (the Trainer's own)."""
    if getattr(trainer, "goat_shuffle", True) or trainer.train_dataset is None:
        return None
    from torch.utils.data import SequentialSampler

    return SequentialSampler(trainer.train_dataset)


def gather_full_parameters(model) -> None:
    """After training under FSDP2 the parameters are sharded DTensors, which the adapter writer
    cannot read; replace each by its full tensor, in place. A collective: every process must call
    it (before only the main process saves). The model is for saving afterwards, not for training
    (FSDP's hooks expect their shards). A no-op without DTensors."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.6
        return
    from torch import nn

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        return
    for unit in units:  # the root stays unsharded after a forward: its parameters view a gather buffer
        unit.reshard()
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                module._parameters[name] = nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad)
