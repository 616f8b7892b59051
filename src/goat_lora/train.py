"""Training on the transformers Trainer, so `torchrun` and `accelerate launch` work unchanged.

    task (data.py) -> model (hf.py) -> method (baselines.py) -> GoatTrainer.train()
        -> test evaluation (evaluate.py) -> run folder: config.json, metrics.json, adapter/, plots

GOAT's load-balancing loss is added in `GoatTrainer.compute_loss`, where a reader can see it:
    loss = task_loss + goat_config.aux_loss_coef * model.aux_loss()
and `ExpertLoadCallback` records the experts' load (the fraction of tokens each received) per epoch.

The run folder is built in a hidden staging folder next to the target and renamed at the end, so
a failed or interrupted run never leaves a half-written run folder behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import __version__
from .baselines import (
    GOAT_METHODS,
    MethodSpec,
    check_method,
    count_parameters,
    expert_load,
    prepare_model,
    reset_expert_load,
)
from .config import GoatConfig, atomic_write_bytes, atomic_write_text
from .data import ExamplesDataset, ImageCollator, TaskData, TextCollator, load_task
from .evaluate import evaluate, router_statistics
from .resume import staging_path

# Learning rate when --lr is not given. GOAT's s = sqrt(3 n / d) makes its update behave like a
# larger learning rate than LoRA's alpha / r, so its default is lower (tuned on Fine Foods).
DEFAULT_LR = {
    "goat": 3e-4, "goat_mini": 3e-4, "goat_s": 3e-4, "molora": 1e-3, "hydralora": 1e-3,
    "lora": 1e-3, "rslora": 1e-3, "dora": 1e-3, "pissa": 5e-4, "milora": 1e-3, "full": 5e-5, "head": 3e-3,
}  # fmt: skip

# Schedule / budget defaults per modality, chosen so `goat train` (MiniLM + Fine Foods) ends in
# under 5 minutes on 2 CPU cores with test accuracy >= 0.80.
TEXT_DEFAULTS = {"epochs": 1, "batch_size": 16, "max_length": 96, "train_size": 2400}
IMAGE_DEFAULTS = {"epochs": 2, "batch_size": 32, "max_length": 0, "train_size": 3000, "test_size": 1000}


@dataclass
class TrainArgs:
    """Everything that defines a run; saved in config.json so the run can be repeated exactly."""

    method: str = "goat"
    model: str | None = None  # None: the shipped MiniLM (text) or EfficientNet-Lite0 (images)
    data: str = "finefoods"
    text_column: str = "text"
    label_column: str = "label"
    test_data: str | None = None
    rank: int = 8
    experts: int = 8
    top_k: int = 2
    lr: float | None = None  # None: DEFAULT_LR[method]
    epochs: float | None = None
    batch_size: int | None = None
    max_length: int | None = None
    train_size: int | None = None  # None: the modality's default; 0: all
    test_size: int | None = None  # None / 0: the whole test split
    seed: int = 0
    aux_loss_coef: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    logging_steps: int = 10
    image_size: int = 64
    eval_each_epoch: bool = True  # accuracy on the validation split after every epoch
    # scale-out and ecosystem (goat_lora.scaleout, goat_lora.causal_lm; docs/scaling.md)
    task: str = "classification"  # or "causal-lm": a decoder on a language-modelling loss
    mask_prompt: bool = False  # causal-lm: no loss on the prompt of instruction data
    dropout: float = 0.05  # the experts' (and LoRA baselines') dropout
    shuffle: bool = True  # False: sequential data order (rank r of N then gets batches r, r+N, ...)
    gradient_checkpointing: bool = False  # activation checkpointing, use_reentrant=False
    bf16: bool = False  # bfloat16 autocast; adapters, routers and optimiser state stay float32
    report_to: str = "tensorboard"  # comma list of tensorboard, wandb; none
    deepspeed: str | None = None  # a DeepSpeed config file (GPU only), e.g. configs/ds_zero2.json
    target_modules: list[str] | None = None  # None: every Linear except the head (images: the 1x1 convs)
    save_steps: int = 500  # a Trainer checkpoint every N steps in the staging folder (--resume); 0: none

    def resolved(self, modality: str) -> "TrainArgs":
        """A copy with every None default filled in (what config.json records)."""
        defaults = IMAGE_DEFAULTS if modality == "image" else TEXT_DEFAULTS
        values = dataclasses.asdict(self)
        for key, value in defaults.items():
            if values.get(key) is None:
                values[key] = value
        if values["lr"] is None:
            values["lr"] = DEFAULT_LR[self.method]
        return TrainArgs(**values)

    def validate(self) -> None:
        check_method(self.method)
        for name in ("rank", "experts", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if self.method in GOAT_METHODS or self.method == "hydralora":
            if self.rank % self.experts:
                raise ValueError(f"--rank {self.rank} must be divisible by --experts {self.experts}")
            if self.top_k > self.experts:
                raise ValueError(f"--top-k {self.top_k} must be <= --experts {self.experts}")
        for name in ("lr", "epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if value is not None and value <= 0 and not (name == "max_length" and value == 0):
                raise ValueError(f"--{name.replace('_', '-')} {value} must be > 0")
        from . import scaleout

        scaleout.validate(self)
        if self.save_steps < 0:
            raise ValueError(f"--save-steps {self.save_steps} must be >= 0 (0: no checkpoints)")


# ---- the Trainer --------------------------------------------------------------------------------
def _goat_model(model):
    from .model import GoatModel

    return model if isinstance(model, GoatModel) else None


class GoatTrainer(Trainer):
    """transformers.Trainer that adds GOAT's load-balancing loss to the task loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean; let Trainer average
        self._aux_sum, self._aux_count = 0.0, 0
        self.goat_shuffle = True  # False: sequential order (TrainArgs.shuffle)

    def _get_train_sampler(self, *args, **kwargs):
        from .scaleout import train_sampler

        return train_sampler(self) or super()._get_train_sampler(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss  # task loss (cross-entropy from the transformers head)
        goat = _goat_model(self.accelerator.unwrap_model(model))
        if goat is not None:
            aux = goat.aux_loss()  # load balance of this forward, summed over adapted layers
            loss = loss + goat.goat_config.aux_loss_coef * aux
            if model.training:
                self._aux_sum += float(aux.detach())
                self._aux_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            if self._aux_count:
                logs["aux_loss"] = round(self._aux_sum / self._aux_count, 4)
                self._aux_sum, self._aux_count = 0.0, 0
            stats = router_statistics(expert_load(self.accelerator.unwrap_model(self.model)))
            if stats:
                logs["expert_balance"] = round(stats["balance"], 4)  # 1 = experts used evenly
        super().log(logs, *args, **kwargs)


class ExpertLoadCallback(TrainerCallback):
    """Records the experts' load over each epoch (layer -> fraction of tokens per expert) and the
    time of every optimisation step."""

    def __init__(self, model) -> None:
        self.model = model
        self.per_epoch: list[dict[str, list[float]]] = []
        self.step_times: list[float] = []
        self._step_start = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        reset_expert_load(self.model)

    def on_epoch_end(self, args, state, control, **kwargs):  # runs before the epoch's evaluation
        self.per_epoch.append(expert_load(self.model))

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self._step_start)


def _accuracy(eval_prediction) -> dict:
    import numpy as np

    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


# ---- memory -------------------------------------------------------------------------------------
def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: writing 5 to clear_refs resets the process' peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    """GPU: peak allocated by torch. CPU: the process' peak resident set size since the reset."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- models -------------------------------------------------------------------------------------
def load_base(args: TrainArgs, task: TaskData):
    """(model, collator, target module names, head module names) for the task's modality."""
    from . import hf
    from .inject import find_target_modules

    num_labels = task.num_labels
    try:
        if task.modality == "image":
            model = hf.load_image_classifier(args.model, num_labels)
        else:
            model = hf.load_sequence_classifier(args.model, num_labels)
            tokenizer = hf.load_tokenizer(args.model)
    except (FileNotFoundError, ValueError) as err:
        if "could not be loaded" in str(err) or "not installed" in str(err) or "not supported" in str(err):
            raise
        raise ValueError(f"model {args.model or 'minilm'!r} could not be loaded: {_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - transformers raises OSError, EnvironmentError, KeyError, ...
        raise ValueError(f"model {args.model or 'minilm'!r} could not be loaded: {_first_line(err)}") from None
    check_finite_weights(model, args.model or ("efficientnet-lite0" if task.modality == "image" else "minilm"))
    head = ["classifier"] if task.modality == "image" else hf.default_modules_to_save(model)
    if args.target_modules:  # names, suffixes or a regex (peft's rules); a ValueError names a miss
        config = GoatConfig(target_modules=list(args.target_modules), modules_to_save=head or None)
        targets = find_target_modules(model, config)
    elif task.modality == "image":
        targets = hf.image_target_modules(model)
    else:
        targets = find_target_modules(model, GoatConfig(target_modules="all-linear", modules_to_save=head or None))
    if task.modality == "image":
        return model, ImageCollator(args.image_size), targets, head
    return model, TextCollator(tokenizer, args.max_length), targets, head


def check_finite_weights(model, name: str) -> None:
    """Refuse a base model with NaN or inf in a weight (every method would train on garbage), naming it."""
    for param_name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param.detach()).all():
            raise ValueError(f"model {name!r}: weight {param_name!r} has NaN or inf values; refusing to train from it")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def build_model(args: TrainArgs, task: TaskData):
    """(base model prepared for args.method, collator, method spec, targets, head)."""
    from transformers import set_seed

    set_seed(args.seed)
    model, collator, targets, head = load_base(args, task)
    spec = MethodSpec(
        rank=args.rank,
        experts=args.experts,
        top_k=args.top_k,
        seed=args.seed,
        aux_loss_coef=args.aux_loss_coef,
        base_model_name_or_path=args.model,
        dropout=args.dropout,
    )
    return prepare_model(args.method, model, spec, targets, head), collator


def save_method_weights(model, args: TrainArgs, folder: str) -> None:
    """GOAT methods: the GoatModel adapter (PEFT layout). Others: their trainable tensors, which
    `load_run` puts back onto a model prepared the same way (same seed, same deterministic init)."""
    import safetensors.torch

    if args.method in GOAT_METHODS:
        model.save_pretrained(folder)
        return
    state = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    atomic_write_bytes(os.path.join(folder, "method_state.safetensors"), safetensors.torch.save(state))


def load_run(run_dir: str):
    """(model with the run's trained weights, collator, TrainArgs, label names) from a run folder."""
    import safetensors.torch

    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{run_dir!r} is not a run folder: {config_path!r} is missing")
    with open(config_path, encoding="utf-8") as fh:
        saved = json.load(fh)
    args = TrainArgs(**saved["args"])
    if saved.get("task") == "causal-lm":
        raise ValueError(f"{run_dir!r} is a causal-lm run; reload it with goat_lora.causal_lm.load_causal_run")
    label_names = saved["label_names"]
    task = TaskData(args.data, saved["modality"], label_names, *([None] * 3))
    adapter = os.path.join(run_dir, "adapter")
    if args.method in GOAT_METHODS:
        from transformers import set_seed

        from .model import GoatModel

        set_seed(args.seed)
        base, collator, _, _ = load_base(args, task)
        model = GoatModel.from_pretrained(base, adapter)
    else:
        model, collator = build_model(args, task)
        weights = os.path.join(adapter, "method_state.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"run weights {weights!r} are missing")
        try:
            state = safetensors.torch.load_file(weights)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"run weights {weights!r} are unreadable: {_first_line(err)}") from None
        missing = set(state) - {n for n, _ in model.named_parameters()}
        if missing:
            raise ValueError(f"run weights {weights!r} do not fit the model: unknown tensors {sorted(missing)[:3]}")
        model.load_state_dict(state, strict=False)
    model.eval()
    return model, collator, args, label_names


# ---- run folders --------------------------------------------------------------------------------
def default_output(method: str, root: str = "runs") -> str:
    return os.path.join(root, f"{time.strftime('%Y%m%d-%H%M%S')}-{method}")


def check_output(output: str, overwrite: bool) -> None:
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)) and not overwrite:
        raise ValueError(f"output {output!r} already exists; choose another --output or pass --overwrite")


def staging_folder(output: str) -> str:
    """A hidden sibling of `output` where the run is built before the final rename (emptied)."""
    staging = staging_path(output)
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    return staging


@contextlib.contextmanager
def building_run_folder(output: str, main_process: bool, staging: str | None = None):
    """Yield the folder a run is built in. When the block ends cleanly, rank 0's folder is renamed
    to `output` and another rank's scratch folder is removed; when anything Python sees goes wrong
    (an exception, Ctrl-C, SIGTERM) the folder is removed, so no half-written run is left. A hard
    kill (SIGKILL) leaves it for `--resume`."""
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


@contextlib.contextmanager
def resumable_run_folder(output: str, main_process: bool, save_steps: int, requested: dict, overwrite: bool,
                         resume_checkpoint: str | None):  # fmt: skip
    """building_run_folder for a run that --resume can continue: a resumed run keeps the killed run's
    staging folder, and with checkpoints on, rank 0 records the settings (`requested`) next to them."""
    staging = None
    if resume_checkpoint is not None and main_process:  # staging/.trainer/checkpoint-N
        staging = os.path.dirname(os.path.dirname(os.path.abspath(resume_checkpoint)))
    with building_run_folder(output, main_process, staging) as staging:
        if save_steps and main_process:
            from .resume import write_resume_state

            write_resume_state(staging, requested, output, overwrite)
        yield staging


def publish(staging: str, output: str) -> None:
    """Rename the finished staging folder to `output` (replacing an old run when overwriting)."""
    output = os.path.abspath(output)
    old = None
    if os.path.exists(output):
        old = f"{output}.old-{os.getpid()}"
        os.replace(output, old)
    os.replace(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.unlink(old)


def write_json(path: str, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# ---- the job ------------------------------------------------------------------------------------
def train(
    args: TrainArgs,
    output: str | None = None,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    save_weights: bool = True,
    plots: bool = True,
    task: TaskData | None = None,
    resume_checkpoint: str | None = None,
) -> dict:
    """Train, evaluate on test, write the run folder; return metrics (also in metrics.json).
    `resume_checkpoint`: continue from a checkpoint in the run's staging folder (goat_lora.resume)."""
    started = time.time()
    args.validate()
    requested = dataclasses.asdict(args)  # before defaults are filled in: what --resume rebuilds from
    if args.task == "causal-lm":  # a decoder on a language-modelling loss: goat_lora.causal_lm
        from .causal_lm import train_causal_lm

        return train_causal_lm(args, output, overwrite=overwrite, quiet=quiet, save_weights=save_weights,
                               resume_checkpoint=resume_checkpoint, requested=requested)  # fmt: skip
    output = output or default_output(args.method)
    check_output(output, overwrite)
    if task is None:
        task = load_task(
            args.data,
            text_column=args.text_column,
            label_column=args.label_column,
            test_data=args.test_data,
            train_size=args.train_size if args.train_size is not None else _default("train_size", args),
            test_size=args.test_size if args.test_size is not None else _default("test_size", args),
            seed=args.seed,
        )
    args = args.resolved(task.modality)
    model, collator = build_model(args, task)
    trainable, total = count_parameters(model)

    # Under torchrun / accelerate launch only rank 0 writes the run folder; the others use scratch.
    main_process = int(os.environ.get("RANK", "0")) == 0
    with resumable_run_folder(output, main_process, args.save_steps, requested, overwrite, resume_checkpoint) as staging:
        metrics = _train_in(staging, model, collator, args, task, trainable, total, quiet, save_weights, plots, started,
                            checkpoint=resume_checkpoint)  # fmt: skip
        if trainable == 0:
            raise ValueError("no trainable parameters")
    metrics["output"] = os.path.abspath(output)
    return metrics


def _default(key: str, args: TrainArgs):
    defaults = IMAGE_DEFAULTS if args.data in ("fashion-mnist", "fashion_mnist", "fashionmnist") else TEXT_DEFAULTS
    if key == "train_size" and args.data not in ("finefoods", "fashion-mnist", "fashion_mnist", "fashionmnist"):
        return None  # a user's own data: use all of it
    return defaults.get(key)


def run_training_arguments(args: TrainArgs, staging: str, quiet: bool, **task_kwargs) -> TrainingArguments:
    """The TrainingArguments every training path shares (schedule, seeds, checkpoints into
    staging/.trainer for --resume, scale-out settings); `task_kwargs` adds the task's own."""
    from . import scaleout

    return TrainingArguments(
        output_dir=os.path.join(staging, ".trainer"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type="linear",
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",  # into staging/.trainer, for --resume
        save_steps=args.save_steps or 500,
        save_total_limit=1,
        **scaleout.training_kwargs(args),  # report_to, bf16, gradient checkpointing, deepspeed
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=quiet,
        log_level="warning" if not quiet else "error",
        **task_kwargs,
    )


def run_trainer(model, training_args: TrainingArguments, args: TrainArgs, staging: str, callback, quiet: bool,
                **trainer_kwargs) -> "GoatTrainer":  # fmt: skip
    """A GoatTrainer with the expert-load callback and the scale-out callbacks (TensorBoard into
    RUN/tensorboard), the run's shuffling, and no printing when `quiet`."""
    from . import scaleout

    trainer = GoatTrainer(model=model, args=training_args, callbacks=[callback, *scaleout.callbacks(args, staging)],
                          **trainer_kwargs)  # fmt: skip
    trainer.goat_shuffle = args.shuffle
    if quiet:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    return trainer


def _train_in(staging, model, collator, args, task, trainable, total, quiet, save_weights, plots, started,
              checkpoint=None) -> dict:  # fmt: skip
    start = time.time()
    reset_peak_memory()
    from . import scaleout

    callback = ExpertLoadCallback(model)
    training_args = run_training_arguments(
        args, staging, quiet,
        per_device_eval_batch_size=64,
        eval_strategy="epoch" if args.eval_each_epoch and len(task.validation) else "no",
        label_names=["labels"],
    )  # fmt: skip
    trainer = run_trainer(
        model, training_args, args, staging, callback, quiet,
        data_collator=collator,
        train_dataset=ExamplesDataset(task.train),
        eval_dataset=ExamplesDataset(task.validation) if len(task.validation) else None,
        compute_metrics=_accuracy,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=checkpoint)
    train_time = time.time() - start
    result = evaluate(model, ExamplesDataset(task.test), collator, batch_size=64, device=training_args.device)
    metrics = _metrics(trainer, callback, result, args, task, trainable, total, train_time, time.time() - started)
    scaleout.gather_full_parameters(model)  # FSDP2: full tensors before rank 0 saves (every rank takes part)
    shutil.rmtree(os.path.join(staging, ".trainer"), ignore_errors=True)
    if not trainer.is_world_process_zero():
        return metrics
    if save_weights:
        save_method_weights(model, args, os.path.join(staging, "adapter"))
    config = {
        "args": dataclasses.asdict(args),
        "modality": task.modality,
        "label_names": task.label_names,
        "data_info": task.info,
        "sizes": {"train": len(task.train), "validation": len(task.validation), "test": len(task.test)},
        "rerun": "goat train --config config.json",
        "goat_config": _goat_config_dict(model),
        "versions": _versions(),
    }
    write_json(os.path.join(staging, "config.json"), config)
    write_json(os.path.join(staging, "metrics.json"), metrics)
    if plots:
        from .report import write_run_plots

        write_run_plots(staging)
    return metrics


def _metrics(trainer, callback, result, args, task, trainable, total, train_time, wall_time) -> dict:
    history = trainer.state.log_history
    train_loss = [
        {k: h[k] for k in ("step", "epoch", "loss", "aux_loss", "expert_balance", "learning_rate") if k in h}
        for h in history
        if "loss" in h
    ]
    per_epoch = [
        {"epoch": h.get("epoch"), "validation_accuracy": h.get("eval_accuracy"), "validation_loss": h.get("eval_loss")}
        for h in history
        if "eval_accuracy" in h
    ]
    steps = callback.step_times[1:] or callback.step_times  # the first step pays one-off costs
    return {
        "method": args.method,
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "majority_accuracy": task.majority_accuracy(),
        "validation_accuracy": per_epoch[-1]["validation_accuracy"] if per_epoch else None,
        "per_epoch_eval": per_epoch,
        "train_loss": train_loss,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "train_time_s": train_time,  # the Trainer's loop, per-epoch validation included
        "wall_time_s": wall_time,  # data and model loading, initialisation, training, test evaluation
        "step_time_s": sum(steps) / len(steps) if steps else None,
        "steps": trainer.state.global_step,
        "distributed": str(trainer.accelerator.distributed_type).split(".")[-1],  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
        "processes": trainer.args.world_size,
        "peak_memory_mb": peak_memory_mb(),
        "expert_load": result["expert_load"],  # over the test set
        "router": result["router"],
        "expert_load_per_epoch": callback.per_epoch,  # over each training epoch
        "sizes": {"train": len(task.train), "validation": len(task.validation), "test": len(task.test)},
    }


def _goat_config_dict(model) -> dict | None:
    goat = _goat_model(model)
    return goat.goat_config.to_dict() if goat is not None else None


def _versions() -> dict:
    import peft
    import transformers

    return {
        "goat_lora": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
    }


def run_eval(run_dir: str, data: str | None = None, output: str | None = None, *, text_column=None,
             label_column=None, batch_size: int = 64, overwrite: bool = False) -> dict:  # fmt: skip
    """Reload a run and evaluate it on its own test split (same seed and sizes) or on `data`;
    writes metrics.json and expert_load.png to `output` (default RUN_DIR/eval-<time>)."""
    from .data import load_eval_split

    model, collator, args, label_names = load_run(run_dir)
    if data is None:
        task = load_task(
            args.data, text_column=args.text_column, label_column=args.label_column, test_data=args.test_data,
            train_size=args.train_size or None, test_size=args.test_size or None, seed=args.seed,
        )  # fmt: skip
        split, source = task.test, {"data": args.data, "split": "the run's test split"}
    else:
        split, source = load_eval_split(
            data, label_names, text_column=text_column or args.text_column, label_column=label_column or args.label_column
        )
        source = {"data": data, **source}
    if not len(split):
        raise ValueError(f"evaluation data {data!r} has no rows")
    output = output or os.path.join(run_dir, f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    check_output(output, overwrite)
    start = time.time()
    result = evaluate(model, ExamplesDataset(split), collator, batch_size=batch_size)
    metrics = {
        "method": args.method,
        "run": os.path.abspath(run_dir),
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "num_examples": result["num_examples"],
        "eval_source": source,
        "expert_load": result["expert_load"],
        "router": result["router"],
        "wall_time_s": time.time() - start,
    }
    staging = staging_folder(output)
    try:
        write_json(os.path.join(staging, "metrics.json"), metrics)
        from .report import write_run_plots

        write_run_plots(staging)
        publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    metrics["output"] = os.path.abspath(output)
    return metrics


# ---- comparisons --------------------------------------------------------------------------------
def compare(
    methods: list[str],
    base: TrainArgs,
    output: str,
    *,
    seeds: list[int],
    lr_grid: dict[str, list[float]] | None = None,
    overwrite: bool = False,
    settings: dict | None = None,
    log=print,
    resume: bool = False,
) -> dict:
    """Each method x learning rate x seed: train on train, validation accuracy after the last epoch
    picks the learning rate per method, the test accuracy at that rate is reported (mean, std).
    Writes report.md, report.json and compare.png (+ runs/<method>-lr<lr>-seed<seed>/metrics.json).

    The comparison is built in the hidden staging folder `.NAME.partial`, and each finished run's
    metrics.json lands there as it finishes. If the comparison is interrupted or killed, the folder
    stays; `resume=True` (`goat compare ... --resume`, same settings and output) reuses the finished
    runs and trains only the others. Without it, a stale folder with finished runs is moved aside to
    `NAME.failed-<time>` rather than deleted."""
    from .baselines import DEFAULT_LR_GRID
    from .report import write_compare_report

    for method in methods:
        check_method(method)
    check_output(output, overwrite)
    plan = {"methods": list(methods), "seeds": list(seeds), "base": dataclasses.asdict(base),
            "lr_grid": {m: list((lr_grid or {}).get(m) or DEFAULT_LR_GRID[m]) for m in methods}}  # fmt: skip
    staging = _compare_staging(output, plan, resume)
    results: list[dict] = []
    tasks: dict[int, TaskData] = {}
    try:
        total = sum(len((lr_grid or {}).get(m) or DEFAULT_LR_GRID[m]) for m in methods) * len(seeds)
        done = 0
        for method in methods:
            grid = (lr_grid or {}).get(method) or DEFAULT_LR_GRID[method]
            for lr in grid:
                for seed in seeds:
                    args = dataclasses.replace(base, method=method, lr=lr, seed=seed)
                    args.validate()
                    if seed not in tasks:  # the same seeded splits for every method
                        tasks[seed] = load_task(
                            args.data, text_column=args.text_column, label_column=args.label_column,
                            test_data=args.test_data, seed=seed,
                            train_size=args.train_size if args.train_size is not None else _default("train_size", args),
                            test_size=args.test_size if args.test_size is not None else _default("test_size", args),
                        )  # fmt: skip
                    run_name = f"{method}-lr{lr:g}-seed{seed}"
                    run_dir = os.path.join(staging, "runs", run_name)
                    finished = os.path.join(run_dir, "metrics.json")
                    if os.path.isfile(finished):  # done before an interruption (only with resume)
                        with open(finished, encoding="utf-8") as fh:
                            metrics = json.load(fh)
                    else:
                        metrics = train(args, run_dir, quiet=True, save_weights=False, plots=False, task=tasks[seed])
                    done += 1
                    row = {k: metrics.get(k) for k in (
                        "method", "validation_accuracy", "test_accuracy", "trainable_params", "trainable_percent",
                        "step_time_s", "peak_memory_mb", "wall_time_s", "router")}  # fmt: skip
                    row.update(lr=lr, seed=seed, run=f"runs/{run_name}")
                    results.append(row)
                    log(
                        f"[{done}/{total}] {method:<9} lr={lr:<7g} seed={seed}  validation "
                        f"{_fmt_acc(row['validation_accuracy'])}  test {_fmt_acc(row['test_accuracy'])}  "
                        f"({row['wall_time_s']:.0f} s)"
                    )
                    # a partial report after every run: a long comparison can be read while it runs
                    write_json(os.path.join(staging, "results.partial.json"), {"runs": results})
        majority = next(iter(tasks.values())).majority_accuracy() if tasks else None
        summary = write_compare_report(staging, results, settings or {}, majority)
        for name in ("results.partial.json", COMPARE_PLAN):
            os.unlink(os.path.join(staging, name))
        publish(staging, output)
    except BaseException:
        if results:  # keep finished runs for --resume, never under the final name
            log(f"goat compare: {len(results)} finished run(s) kept in {staging}; "
                "run the same command with --resume to continue")
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


COMPARE_PLAN = "compare_plan.json"


def _compare_staging(output: str, plan: dict, resume: bool) -> str:
    """The staging folder of a comparison: reused when resuming the same plan, else a fresh one (a
    stale folder holding finished runs is moved aside, never deleted)."""
    staging = staging_path(output)
    plan_path = os.path.join(staging, COMPARE_PLAN)
    plan = json.loads(json.dumps(plan, default=str))  # as it reads back from disk
    if resume:
        if not os.path.isfile(plan_path):
            raise ValueError(f"--resume: no interrupted comparison for {output!r} ({plan_path!r} does not exist)")
        with open(plan_path, encoding="utf-8") as fh:
            saved = json.load(fh)
        if saved != plan:
            differing = sorted(k for k in plan if saved.get(k) != plan.get(k))
            raise ValueError(f"--resume: the interrupted comparison in {staging!r} ran other settings "
                             f"(differing: {', '.join(differing)}); use the same command, or drop --resume")  # fmt: skip
        return staging
    if os.path.isdir(os.path.join(staging, "runs")) and os.listdir(os.path.join(staging, "runs")):
        os.replace(staging, f"{os.path.abspath(output)}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
    staging = staging_folder(output)
    write_json(plan_path, plan)
    return staging


def _fmt_acc(value) -> str:
    return "-" if value is None else f"{value:.4f}"
