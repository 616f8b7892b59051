"""The transformers Trainer, with GOAT's balance loss where a reader can see it.

    loss = task_loss + goat_config.aux_loss_coef * model.aux_loss()        (GoatTrainer.compute_loss)
    loss = task_loss + methods.method_loss(model)[0]     the others: MixLoRA's balance loss, KaSA's regularisers

`GoatTrainer.evaluate` runs the task's own evaluation (accuracy, correlation, exact match of a
generated answer, ...) on the validation split when the Trainer schedules one, so every family is
validated after every epoch by the same code that tests it. `ExpertLoadCallback` records the
experts' load per epoch and the time of every optimisation step. torchrun / accelerate launch work
unchanged (goat_lora.scaleout holds the scale-out knobs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .. import scaleout
from ..methods import expert_load, method_loss, reset_expert_load
from ..report import router_statistics
from ..settings import compile_mode
from ..tasks.base import better


def goat_model(model):
    """The GoatModel inside `model`, or None for the other methods."""
    from ..model import GoatModel

    return model if isinstance(model, GoatModel) else None


class GoatTrainer(Trainer):
    """transformers.Trainer that adds GOAT's load-balancing loss to the task loss and validates with
    the task's own metrics (`goat_validate`: a function returning {metric: value})."""

    def __init__(
        self,
        *args,
        goat_validate: Callable[[], dict] | None = None,
        goat_shuffle: bool = True,
        goat_aux_loss_coef: float = 0.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.goat_aux_loss_coef = goat_aux_loss_coef  # MixLoRA's balance-loss weight (GOAT's is in its GoatConfig)
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean; let Trainer average
        self.goat_validate = goat_validate
        self.goat_shuffle = goat_shuffle  # False: sequential order (--no-shuffle)
        self._aux_sum, self._aux_count = 0.0, 0

    def _get_train_sampler(self, *args, **kwargs):
        return scaleout.train_sampler(self) or super()._get_train_sampler(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss  # the task's loss, computed by the transformers model from `labels`
        # keep_torch_compile=False: with --compile the model here is torch.compile's wrapper, not the GoatModel
        goat = goat_model(self.accelerator.unwrap_model(model, keep_torch_compile=False))
        if goat is not None:
            aux = goat.aux_loss()  # load balance of this forward, summed over adapted layers
            loss = loss + goat.goat_config.aux_loss_coef * aux
            if model.training:
                self._aux_sum += float(aux.detach())
                self._aux_count += 1
        elif (
            extra := method_loss(
                self.accelerator.unwrap_model(model, keep_torch_compile=False), self.goat_aux_loss_coef
            )
        ) is not None:  # MixLoRA's balance loss, KaSA's regularisers
            loss = loss + extra[0]
            if model.training:
                self._aux_sum += float(extra[1].detach())
                self._aux_count += 1
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A GoatModel is not a PreTrainedModel, so the Trainer writes its state dict with safetensors, which
        refuses tensors that share memory (tied input / output embeddings, as in SmolLM2). One name per
        shared tensor is kept: resuming loads with strict=False, and loading one name fills every alias."""
        if state_dict is None:
            state_dict, seen = {}, set()
            for name, tensor in self.model.state_dict().items():
                key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
                if key not in seen:
                    seen.add(key)
                    state_dict[name] = tensor
        super()._save(output_dir, state_dict)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        if self.goat_validate is None or eval_dataset is not None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        start = time.time()
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in self.goat_validate().items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            if self._aux_count:
                logs["aux_loss"] = round(self._aux_sum / self._aux_count, 4)
                self._aux_sum, self._aux_count = 0.0, 0
            stats = router_statistics(expert_load(self.accelerator.unwrap_model(self.model, keep_torch_compile=False)))
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


class ConsoleProgress(TrainerCallback):
    """What a person watching a run sees: one progress bar over the optimisation steps whose postfix
    holds the last logged loss, learning rate, balance loss and expert balance, and one line per
    evaluation. It replaces the Trainer's printed dictionaries; the logs still reach TensorBoard,
    wandb and metrics.json unchanged. Only the main process prints."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="training", unit="step", dynamic_ncols=True
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        shown = {"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0.0):.2e}"}
        if "aux_loss" in logs:
            shown["aux"] = f"{logs['aux_loss']:.2f}"
        if "expert_balance" in logs:
            shown["balance"] = f"{logs['expert_balance']:.3f}"
        self.bar.set_postfix(shown, refresh=False)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.bar is None or not metrics:
            return
        values = ", ".join(
            f"{key[5:]} {value:.4f}"
            for key, value in metrics.items()
            if key.startswith("eval_") and key != "eval_runtime" and isinstance(value, (int, float))
        )
        self.bar.write(f"epoch {state.epoch:g}: validation {values} ({metrics.get('eval_runtime', 0.0):.1f} s)")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Close the bar. Also after Ctrl-C or an error (close_progress), which the Trainer reports to
        no callback: a bar left open is drawn again when Python exits, after the command's last line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def close_progress(trainer) -> None:
    """Close the console progress bar of `trainer`, however its training ended."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ConsoleProgress):
            callback.close()


class BestEpoch(TrainerCallback):
    """Keeps a copy of the trainable parameters of the epoch whose validation metric was best, so the
    run can be tested (and saved) at that epoch: the paper's protocol. The copy lives in CPU memory
    (the trainable parameters only: a LoRA's worth for the adapters, the whole model for full
    fine-tuning) and, when the run checkpoints for --resume, in `folder` as well."""

    FILE = "best_epoch.safetensors"

    def __init__(self, model, metric: str, lower_is_better: bool, folder: str | None = None) -> None:
        self.model, self.metric, self.lower_is_better, self.folder = model, metric, lower_is_better, folder
        self.value: float | None = None
        self.loss: float | None = None  # the validation loss at the best epoch: breaks ties of the metric
        self.epoch: float | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def _better(self, value: float, loss: float | None) -> bool:
        """A better metric wins; an equal one wins with a lower validation loss (an exact match stuck
        at 0 for several epochs then still picks the epoch whose model is closest to the answers)."""
        if self.value is None or value != self.value:
            return better(value, self.value, self.lower_is_better)  # NaN never wins
        return loss is not None and self.loss is not None and loss < self.loss

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value, loss = (metrics or {}).get(f"eval_{self.metric}"), (metrics or {}).get("eval_loss")
        if not self._better(value, loss):
            return
        self.value, self.loss, self.epoch = float(value), loss, state.epoch
        self.state = {
            name: p.detach().to("cpu", copy=True) for name, p in self.model.named_parameters() if p.requires_grad
        }
        if self.folder is not None and state.is_world_process_zero:
            import safetensors.torch

            from ..files import atomic_write_bytes

            meta = {
                "epoch": str(self.epoch),
                "value": str(self.value),
                "loss": str(self.loss),
                "step": str(state.global_step),
            }
            atomic_write_bytes(os.path.join(self.folder, self.FILE), safetensors.torch.save(self.state, metadata=meta))

    def resume(self, up_to_step: int) -> None:
        """After --resume: the best epoch seen before the checkpoint at `up_to_step` (a later one is
        replayed by the resumed training)."""
        path = os.path.join(self.folder or "", self.FILE)
        if self.folder is None or not os.path.isfile(path):
            return
        from safetensors import safe_open

        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata()
            if int(meta["step"]) <= up_to_step:
                self.state = {key: fh.get_tensor(key) for key in fh.keys()}
                self.value, self.epoch = float(meta["value"]), float(meta["epoch"])
                self.loss = None if meta["loss"] == "None" else float(meta["loss"])

    def restore(self) -> None:
        """Put the best epoch's parameters back into the model (nothing when no validation ran)."""
        if self.state is None:
            return
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self.state:
                    param.copy_(self.state[name])


def warmup_arguments(ratio: float, fields=None) -> dict:
    """The TrainingArguments that give a warm-up over `ratio` of the steps: transformers 4.x has
    `warmup_ratio` (its `warmup_steps` is an integer count, and 0.06 steps would mean no warm-up);
    transformers 5 dropped `warmup_ratio` and reads a `warmup_steps` below 1 as a ratio."""
    fields = TrainingArguments.__dataclass_fields__ if fields is None else fields
    return {"warmup_ratio": ratio} if "warmup_ratio" in fields else {"warmup_steps": ratio}


REGIONAL_VARIABLE = "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"
_USER_REGIONAL = os.environ.get(REGIONAL_VARIABLE)  # the user's choice, if any, as the process started


def compile_arguments(settings) -> dict:
    """--compile: the Trainer (through accelerate) compiles the model. Outside CUDA graphs regionally:
    each repeated transformer block is compiled once and its code reused by the others (PyTorch's
    "regional compilation" recipe, accelerate's compile_regions), the rest of the model apart; on
    MiniLM this cut GOAT's compile time by a third (docs/benchmarks.md). The whole model with CUDA graphs
    ("reduce-overhead", the default on CUDA), as the GPU checks capture it (regional capture is not
    checked on a GPU yet), and with activation checkpointing: an eager checkpoint around a compiled
    block would re-run the block's routing records in backward (docs/design.md).
    ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION set by the user is respected. With activation
    checkpointing, dynamo is told to record a checkpointed block's side effects (GOAT's routing
    statistics and expert-load counts) once, in the forward: the compiled backward recomputes tensors
    only, which is what eager GOAT does by skipping its record during the recompute."""
    if not getattr(settings, "compile", False):
        return {}
    if settings.gradient_checkpointing:
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    arguments = {"torch_compile": True, "torch_compile_backend": settings.compile_backend}
    mode = compile_mode(settings.compile_mode, torch.cuda.is_available())
    if mode is not None:
        arguments["torch_compile_mode"] = mode
    if _USER_REGIONAL is None:  # read by accelerate's dynamo plugin; set for each run (a comparison runs many)
        regional = mode != "reduce-overhead" and not settings.gradient_checkpointing
        os.environ[REGIONAL_VARIABLE] = str(regional)
    return arguments


def training_arguments(settings, staging: str, quiet: bool, **task_kwargs) -> TrainingArguments:
    """The TrainingArguments every run shares (schedule, seeds, checkpoints into staging/.trainer
    for --resume, scale-out settings); `task_kwargs` adds the rest."""
    return TrainingArguments(
        output_dir=os.path.join(staging, ".trainer"),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        num_train_epochs=settings.epochs,
        learning_rate=settings.lr,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        **warmup_arguments(settings.warmup_ratio),
        lr_scheduler_type=settings.lr_scheduler,
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_steps else "no",  # into staging/.trainer, for --resume
        save_steps=settings.save_steps or 500,
        save_total_limit=1,
        **scaleout.training_kwargs(settings),  # report_to, bf16, gradient checkpointing, deepspeed
        **compile_arguments(settings),
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=quiet,
        log_level="warning" if not quiet else "error",
        **task_kwargs,
    )


def make_trainer(
    model, training_args: TrainingArguments, settings, staging: str, callbacks: list, **trainer_kwargs
) -> GoatTrainer:
    """A GoatTrainer with the given callbacks, the console progress (none when the arguments are quiet:
    training_arguments(quiet=True) disables tqdm) and the scale-out ones (TensorBoard into
    RUN/tensorboard), and the run's shuffling."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    console = [] if training_args.disable_tqdm else [ConsoleProgress()]
    trainer = GoatTrainer(
        model=model,
        args=training_args,
        goat_shuffle=settings.shuffle,
        goat_aux_loss_coef=settings.aux_loss_coef,
        callbacks=[*callbacks, *console, *scaleout.callbacks(settings, staging)],
        **trainer_kwargs,
    )
    trainer.remove_callback(PrinterCallback)  # the raw dictionaries; ConsoleProgress shows them readably
    trainer.remove_callback(ProgressCallback)
    return trainer


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
