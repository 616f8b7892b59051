"""One run, for any task family: settings -> data -> model -> Trainer -> test metrics -> run folder.

    (engine.resolve: resolve -> Run, preflight: the settings and data, checked before any model loads)
    train(run, output)           train, evaluate on test, write the run folder; return metrics.json's dict
    resume(run)                  continue a killed run from its newest complete checkpoint
    load_run(run_dir)            the trained model of a run folder, rebuilt on a fresh base
    evaluate_run(run_dir, ...)   `goat eval`: reload a run, evaluate it, write metrics.json

Run folder: config.json (every setting, resolved; `goat train --config RUN/config.json` repeats the
run; "task_meta" is what the task needs to rebuild the model, e.g. class names), metrics.json
(`test_<metric>` for each of the task's metrics, validation per epoch, training loss, expert load,
cost), adapter/ (GOAT methods: the PEFT-layout adapter; other methods: their trained tensors),
predictions.jsonl (families that generate), loss.png and expert_load.png.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch

from .. import __version__, scaleout
from ..methods import (
    GOAT_METHODS,
    count_parameters,
    data_dependent_state,
    expert_load,
    init_cost,
    loraga_batches,
    prepare_model,
    recording_expert_load,
    reset_expert_load,
)
from ..files import atomic_write_bytes
from ..rate_rule import lora_equivalent_lr
from ..report import method_label, router_statistics
from ..settings import RunSettings
from ..tasks import get_task
from ..tasks.base import Evaluation, ModelParts, Task, TaskData, data_note
from .folders import building_run_folder, check_output, default_output, read_json, write_json, write_jsonl
from .checkpoints import TRAINER_DIR, find_resumable, write_resume_state
from .resolve import Run, epochs_for_data, resolve_run
from .trainer import (
    BestEpoch,
    GoatTrainer,
    ExpertLoadCallback,
    close_progress,
    goat_model,
    make_trainer,
    peak_memory_mb,
    reset_peak_memory,
    training_arguments,
)

CONFIG_FILE, METRICS_FILE, PREDICTIONS_FILE = "config.json", "metrics.json", "predictions.jsonl"


@dataclass(frozen=True)
class Writing:
    """How a training run writes its folder."""

    overwrite: bool = False  # replace an existing --output
    quiet: bool = False  # no progress bar (goat compare's runs)
    save_weights: bool = True  # adapter/ (goat compare's runs keep their metrics only)
    plots: bool = True  # loss.png and expert_load.png


@dataclass(frozen=True)
class Job:
    """A training run under way: the resolved run, its data, the prepared model, its staging folder."""

    run: Run
    data: TaskData
    parts: ModelParts
    model: torch.nn.Module
    staging: str
    counts: tuple[int, int]  # (trainable, total) parameters as prepared
    started: float  # time.time() when train() began: the run's wall time counts from it
    main_process: bool  # rank 0 (or the only process): the one that writes the run folder
    lr: float  # the learning rate trained with: --lr, or the rate rule's from --lr-from-lora
    lr_rule: dict | None = None  # what the rate rule gave (rate_rule.LoraEquivalentRate), when it was used


# ---- models -------------------------------------------------------------------------------------
def build_model(run: Run, meta: dict, train_split=None) -> tuple[ModelParts, torch.nn.Module]:
    """(the task's parts, its base model prepared for the run's method). `train_split`: the run's training
    data, for a method whose start depends on it (LoRA-GA); None when a run folder is reloaded."""
    from transformers import set_seed

    settings = run.settings
    set_seed(settings.seed)
    parts = run.task.build(settings, meta)
    check_finite_weights(parts.model, settings.model)
    batches = None
    if settings.method == "lora_ga" and train_split is not None:
        batches = loraga_batches(settings, train_split, parts.collator)
    return parts, prepare_model(settings.method, parts.model, settings, parts.targets, parts.head, batches)


def learning_rate(settings, model) -> tuple[float, dict | None]:
    """(the rate to train with, what the rate rule gave or None): --lr, or for --lr-from-lora the rate at
    which the built model's GOAT layers move like a LoRA's at that rate (goat_lora.rate_rule). The
    settings keep what was asked for, so config.json reloads as given; metrics.json records the rate."""
    if settings.lr_from_lora is None:
        return settings.lr, None
    rule = lora_equivalent_lr(model, settings.lr_from_lora, settings.r, settings.lora_alpha)
    return rule.lr, rule.to_dict()


def check_finite_weights(model, name: str | None) -> None:
    """Refuse a base model with NaN or inf in a weight (every method would train on garbage), naming it."""
    for param_name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param.detach()).all():
            raise ValueError(f"model {name!r}: weight {param_name!r} has NaN or inf values; refusing to train from it")


def save_method_weights(model, method: str, folder: str) -> None:
    """GOAT methods: the GoatModel adapter (PEFT layout). Others: their trainable tensors, which
    `load_run` puts back onto a model prepared the same way (same seed, same deterministic init)."""
    import safetensors.torch

    if method in GOAT_METHODS:
        model.save_pretrained(folder)
        return
    state = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    state.update(data_dependent_state(model))  # LoRA-GA's base weights: a rebuild without the data lacks them
    atomic_write_bytes(os.path.join(folder, "method_state.safetensors"), safetensors.torch.save(state))


def evaluate_split(
    task: Task, model, split, parts: ModelParts, settings: RunSettings, device
) -> tuple[Evaluation, dict]:
    """(the task's evaluation of `model` on `split`, the experts' load over that pass)."""
    reset_expert_load(model)
    with recording_expert_load(model):  # GOAT counts its experts' load at inference only when asked
        evaluation = task.evaluate(model, split, parts, settings, device)
    load = expert_load(model)
    reset_expert_load(model)
    return evaluation, load


# ---- training -----------------------------------------------------------------------------------
def train(
    run: Run | RunSettings,
    output: str | None = None,
    *,
    data: TaskData | None = None,
    writing: Writing = Writing(),
    resume_checkpoint: str | None = None,
) -> dict:
    """Train, evaluate on test, write the run folder; return the metrics (also in metrics.json).
    `run`: resolved (engine.resolve), or settings that are resolved here. `data`: the task's data,
    already loaded (preflight; goat compare shares it between methods). `resume_checkpoint`: continue
    from a checkpoint in the run's staging folder (engine.checkpoints)."""
    started = time.time()
    run = run if isinstance(run, Run) else resolve_run(run)
    settings = run.settings
    output = output or default_output(settings.method)
    check_output(output, writing.overwrite)
    data = data if data is not None else run.task.load_data(settings)
    if settings.epochs is None:  # the family leaves the budget to the data's size
        settings = settings.replace(epochs=epochs_for_data(len(data.train), settings))
        run = Run(settings, run.task, run.given)
    parts, model = build_model(run, data.meta, data.train)
    counts = count_parameters(model)
    if counts[0] == 0:
        raise ValueError("no trainable parameters")
    lr, lr_rule = learning_rate(settings, model)

    # Under torchrun / accelerate launch only rank 0 writes the run folder; the others use scratch.
    main_process = int(os.environ.get("RANK", "0")) == 0
    staging = None
    if resume_checkpoint is not None and main_process:  # staging/.trainer/checkpoint-N
        staging = os.path.dirname(os.path.dirname(os.path.abspath(resume_checkpoint)))
    with building_run_folder(output, main_process, staging, replace=writing.overwrite) as staging:
        if settings.save_steps and main_process:
            write_resume_state(staging, run.given.to_dict(), output, writing.overwrite)
        job = Job(run, data, parts, model, staging, counts, started, main_process, lr, lr_rule)
        metrics = _train_in(job, resume_checkpoint, writing)
    metrics["output"] = os.path.abspath(output)
    return metrics


def _train_in(job: Job, checkpoint: str | None, writing: Writing) -> dict:
    """Train `job` in its staging folder, test its selected epoch, and (main process) write the folder."""
    settings, task, data, model = job.run.settings, job.run.task, job.data, job.model
    reset_peak_memory()
    start = time.time()
    callback = ExpertLoadCallback(model)
    validating = settings.eval_each_epoch and len(data.validation) > 0
    training_args = training_arguments(
        settings.replace(lr=job.lr), job.staging, writing.quiet, eval_strategy="epoch" if validating else "no"
    )
    device = training_args.device

    def validate() -> dict:
        return evaluate_split(task, model, data.validation, job.parts, settings, device)[0].metrics

    best = BestEpoch(
        model,
        settings.metric,
        settings.metric in task.lower_is_better,
        os.path.join(job.staging, TRAINER_DIR) if settings.save_steps else None,
    )
    if checkpoint is not None:
        best.resume(int(checkpoint.rsplit("-", 1)[-1]))
    trainer = make_trainer(
        model,
        training_args,
        settings,
        job.staging,
        [callback, best],
        data_collator=job.parts.collator,
        train_dataset=data.train,
        eval_dataset=data.validation if validating else None,
        goat_validate=validate,
    )
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:  # Ctrl-C, SIGTERM or an error: the bar closed first, so the command's message is the last line
        close_progress(trainer)
    train_time = time.time() - start
    if settings.select == "best-epoch":
        best.restore()  # test and save the epoch with the best validation metric
    test, load = evaluate_split(task, model, data.test, job.parts, settings, device)
    metrics = run_metrics(job, trainer, callback, test, load, train_time)
    metrics.update(init_cost(model))  # LoRA-GA's gradient estimate, before training and outside train_time_s
    selected = settings.select == "best-epoch" and best.state is not None
    metrics["best_epoch"] = best.epoch  # the epoch with the best validation metric (None without validation)
    metrics["selected_epoch"] = best.epoch if selected else trainer.state.epoch  # the epoch tested and saved
    if selected:  # the validation value of the tested model, which goat compare ranks learning rates by
        metrics[f"validation_{settings.metric}"] = best.value
    scaleout.gather_full_parameters(model)  # FSDP2: full tensors before rank 0 saves (every rank takes part)
    shutil.rmtree(os.path.join(job.staging, TRAINER_DIR), ignore_errors=True)
    if job.main_process:
        write_run_folder(job, metrics, test, writing)
    return metrics


def write_run_folder(job: Job, metrics: dict, test: Evaluation, writing: Writing) -> None:
    """config.json, metrics.json, predictions.jsonl, the adapter and the plots, into the staging folder."""
    settings, data = job.run.settings, job.data
    if writing.save_weights:
        save_method_weights(job.model, settings.method, os.path.join(job.staging, "adapter"))
    config = {
        "args": settings.to_dict(),
        "task_meta": data.meta,
        "label_names": data.label_names,  # also in task_meta; kept where goat-lora 0.1.0 had it
        "data_info": data.info,
        "sizes": metrics["sizes"],
        "rerun": "goat train --config config.json",
        "goat_config": _goat_config_dict(job.model),
        "versions": versions(),
    }
    write_json(os.path.join(job.staging, CONFIG_FILE), config)
    write_json(os.path.join(job.staging, METRICS_FILE), metrics)
    if test.rows is not None:
        write_jsonl(os.path.join(job.staging, PREDICTIONS_FILE), test.rows)
    if writing.plots:
        from ..report import write_run_plots

        write_run_plots(job.staging)


def run_metrics(
    job: Job, trainer: GoatTrainer, callback: ExpertLoadCallback, test: Evaluation, load: dict, train_time: float
) -> dict:
    """metrics.json's dict: the test metrics first, then validation, training, the experts' load, cost."""
    settings, task, data = job.run.settings, job.run.task, job.data
    trainable, total = job.counts
    history = trainer.state.log_history
    train_loss = [
        {k: h[k] for k in ("step", "epoch", "loss", "aux_loss", "expert_balance", "learning_rate") if k in h}
        for h in history
        if "loss" in h
    ]
    names = [*task.metrics, "loss"]
    per_epoch = [
        {"epoch": h.get("epoch"), **{f"validation_{n}": h.get(f"eval_{n}") for n in names}}
        for h in history
        if f"eval_{settings.metric}" in h
    ]
    steps = callback.step_times[1:] or callback.step_times  # the first step pays one-off costs
    return {
        "task": task.name,
        "method": settings.method,
        "quantize": settings.quantize,  # the base's bitsandbytes quantization, or None
        "metric": settings.metric,
        **{f"test_{name}": value for name, value in test.metrics.items()},
        "constant_baseline": task.constant_baseline(data),  # the best constant prediction's test metrics
        f"validation_{settings.metric}": per_epoch[-1][f"validation_{settings.metric}"] if per_epoch else None,
        "per_epoch_eval": per_epoch,
        "data_note": data_note(data.info),  # the source's note and every dropped-rows record, in words
        "dropped_rows": data.info.get("dropped_rows", []),  # [{"source", "rows", "why"}]: rows left out of the data
        **test.extra,
        "train_loss": train_loss,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "lr": job.lr,  # the learning rate trained with
        "lr_rule": job.lr_rule,  # how --lr-from-lora gave it (None with --lr)
        "train_time_s": train_time,  # the Trainer's loop, per-epoch validation included
        "wall_time_s": time.time() - job.started,  # loading the data and model, initialisation, training, test
        "step_time_s": sum(steps) / len(steps) if steps else None,
        "steps": trainer.state.global_step,
        "distributed": str(trainer.accelerator.distributed_type).split(".")[
            -1
        ],  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
        "processes": trainer.args.world_size,
        "peak_memory_mb": peak_memory_mb(),
        "expert_load": load,  # over the test set
        "router": router_statistics(load),
        "expert_load_per_epoch": callback.per_epoch,  # over each training epoch
        "sizes": {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)},
    }


def _goat_config_dict(model) -> dict | None:
    goat = goat_model(model)
    return goat.goat_config.to_dict() if goat is not None else None


def versions() -> dict:
    import peft
    import transformers

    return {
        "goat_lora": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
    }


def resume(run: str, *, overwrite: bool = False, quiet: bool = False) -> dict:
    """Continue a killed `goat train` run from its newest complete checkpoint; returns its metrics."""
    state, _, checkpoint, state_path = find_resumable(run)
    given = RunSettings.from_dict(state["args"], f"--resume {run!r}: {state_path!r}")
    writing = Writing(overwrite=overwrite or bool(state.get("overwrite")), quiet=quiet)
    return train(resolve_run(given), state["output"], writing=writing, resume_checkpoint=checkpoint)


# ---- reloading and evaluating a run -------------------------------------------------------------
def load_run(run_dir: str) -> tuple[torch.nn.Module, ModelParts, Run]:
    """(model with the run's trained weights, its parts, the run resolved from its config.json) from a
    run folder, any family, also folders written by earlier versions (goat-lora 0.1.0 included)."""
    import safetensors.torch

    saved = read_json(os.path.join(run_dir, CONFIG_FILE), f"{run_dir!r} is not a run folder:")
    run = resolve_run(RunSettings.from_dict(saved.get("args"), f"{os.path.join(run_dir, CONFIG_FILE)!r}"))
    settings, task = run.settings, run.task
    meta = saved.get("task_meta") or {"label_names": saved.get("label_names")}
    adapter = os.path.join(run_dir, "adapter")
    if settings.method in GOAT_METHODS:
        from transformers import set_seed

        from ..model import GoatModel

        set_seed(settings.seed)
        parts = task.build(settings, meta)
        model = GoatModel.from_pretrained(parts.model, adapter)
    else:
        parts, model = build_model(run, meta)
        weights = os.path.join(adapter, "method_state.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"run weights {weights!r} are missing")
        try:
            state = safetensors.torch.load_file(weights)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"run weights {weights!r} are unreadable: {str(err).splitlines()[0]}") from None
        missing = set(state) - {n for n, _ in model.named_parameters()}
        if missing:
            raise ValueError(f"run weights {weights!r} do not fit the model: unknown tensors {sorted(missing)[:3]}")
        model.load_state_dict(state, strict=False)
    model.eval()
    return model, parts, run


def evaluate_run(
    run_dir: str, output: str | None = None, *, overrides: dict | None = None, overwrite: bool = False
) -> dict:
    """Reload a run and evaluate it on its own test split (same seed and sizes), or on
    overrides["data"] (a built-in data set, a file or a hub name, with the run's classes); write
    metrics.json (the run's metric names), predictions.jsonl where the task has them, and
    expert_load.png to `output` (default RUN_DIR/eval-<time>)."""
    model, parts, run = load_run(run_dir)
    task = run.task
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    source = overrides.pop("data", None)
    settings = run.settings.replace(**overrides).validate()
    output = output or os.path.join(run_dir, f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    check_output(output, overwrite)
    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if source is None:
        data = task.load_data(settings)
        split, where = (
            data.test,
            {"data": settings.data, "split": "the run's test split", "note": data.info.get("note")},
        )
    else:
        split, where = task.load_eval_split(settings.replace(data=source), source, parts.meta), {"data": source}
    if not len(split):
        raise ValueError(f"evaluation data {source or settings.data!r} has no rows")
    evaluation, load = evaluate_split(task, model, split, parts, settings, device)
    metrics = {
        "task": task.name,
        "method": settings.method,
        "quantize": settings.quantize,
        "metric": settings.metric,
        "run": os.path.abspath(run_dir),
        **{f"test_{name}": value for name, value in evaluation.metrics.items()},
        "num_examples": len(split),
        "eval_source": where,
        **evaluation.extra,
        "expert_load": load,
        "router": router_statistics(load),
        "wall_time_s": time.time() - start,
    }
    with building_run_folder(output, main_process=True, replace=overwrite) as staging:
        write_json(os.path.join(staging, METRICS_FILE), metrics)
        if evaluation.rows is not None:
            write_jsonl(os.path.join(staging, PREDICTIONS_FILE), evaluation.rows)
        from ..report import write_run_plots

        write_run_plots(staging)
    metrics["output"] = os.path.abspath(output)
    return metrics


def summary_line(metrics: dict, task: Task | None = None) -> str:
    """The printed result: the chosen metric first (with the best constant prediction's value), the
    task's other metrics, method, trainable parameters, time."""
    task = task or get_task(metrics["task"])
    metric = metrics["metric"]
    baseline = (metrics.get("constant_baseline") or {}).get(metric)
    text = f"test {metric} {metrics[f'test_{metric}']:.4f}"
    if baseline is not None:
        text += f" ({task.baseline_name} {baseline:.4f})"
    others = [
        f"{name} {metrics[f'test_{name}']:.4f}" for name in task.metrics if name != metric and f"test_{name}" in metrics
    ]
    if others:
        text += " | " + ", ".join(others)
    text += f" | {method_label(metrics['method'], metrics.get('quantize'))}"
    if "trainable_params" in metrics:
        text += f" | trainable {metrics['trainable_params']:,d} params ({metrics['trainable_percent']:.2f}%)"
    return text + f" | {metrics['wall_time_s']:.0f} s"
