"""A run resolved once, before anything heavy is imported: what the engine passes on.

    resolve_run(settings | flags, config)     every knob filled in, in the one order of precedence, checked -> Run
    given_settings(settings | flags, config)  its first half: what the user gave (--config, --recipe, flags)
    read_config_file(path)                    the settings of `--config FILE`
    preflight(run, output, overwrite)         the task's data loaded and --output checked, before any model loads
    plan_entries(methods, vary)               the rows of `goat compare` (methods, then GOAT variants); Comparison
    epochs_for_data(examples, settings)       the training budget a family leaves to the data's size

This module imports the settings, the task families and the method registry only (no Trainer, no peft,
no bitsandbytes): a missing data file, a bad column or an unusable --output is refused in one line
before a model or the quantization stack is loaded (engine.run does that afterwards).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .. import scaleout
from ..hf import check_model_name
from ..methods import (
    DEFAULT_LR_GRID,
    GOAT_METHODS,
    RATE_RULE_METHODS,
    check_adapter,
    check_method,
    check_quantize,
    method_defaults,
)
from ..recipes import recipe_values
from ..settings import (
    CUDA_GRAPH_PAD_MULTIPLE,
    RunSettings,
    compile_mode,
    field_type,
    in_flag_terms,
    knob_fields,
    knob_name,
)
from ..tasks import get_task
from ..tasks.base import Task, TaskData
from .folders import check_output, read_json


@dataclass(frozen=True)
class Run:
    """A resolved run: what every function of the engine takes."""

    settings: RunSettings  # every knob filled in and checked
    task: Task  # the task family of settings.task
    given: RunSettings  # before the family's and the method's defaults: what --resume rebuilds from


def given_settings(
    settings: RunSettings | None = None, *, flags: dict | None = None, config: str | None = None
) -> RunSettings:
    """What the user gave, highest last: `settings` (or the settings of --config FILE), then the values of
    --recipe (named in `flags`), then the other `flags`. Knobs nobody gave keep their default or None."""
    if settings is not None and config is not None:
        raise TypeError("give settings or a config file, not both")
    given = read_config_file(config) if config else (settings or RunSettings())
    flags = dict(flags or {})
    recipe = flags.pop("recipe", None)
    if recipe is not None:
        given = given.replace(**_one_rate(recipe_values(recipe)), recipe=recipe)
    return given.replace(**_one_rate(flags)).validate()


def _one_rate(values: dict) -> dict:
    """A level that gives the rate one way clears the other way given below it (--lr-from-lora on the
    command line over a recipe's lr, and the reverse); both at one level are refused (check_rate)."""
    values = dict(values)
    if values.get("lr") is not None and values.get("lr_from_lora") is None:
        values["lr_from_lora"] = None
    if values.get("lr_from_lora") is not None and values.get("lr") is None:
        values["lr"] = None
    return values


def resolve_run(settings: RunSettings | None = None, *, flags: dict | None = None, config: str | None = None) -> Run:
    """The run, resolved in the one order of precedence, lowest first:

        knob default < task family < method < --config FILE (or `settings`) < --recipe < flags

    The family (model, data, epochs, batch size, ...) and the method (learning rate, LoRA alpha, GOAT's
    init and scaling) fill only knobs whose default is None and that nobody gave. Then every check,
    one line each: knob types and ranges, the method, the adapter's rules (GoatConfig.validate),
    the quantized route, scale-out."""
    given = given_settings(settings, flags=flags, config=config)
    task = get_task(given.task)
    check_method(given.method)
    values = given.to_dict()
    chosen = {**task.defaults(given), **method_defaults(given)}  # the method's win over the family's
    for key, value in chosen.items():
        if values[key] is None:
            values[key] = value
    check_rate(given, values["method"])
    if values["metric"] is None:
        values["metric"] = task.metrics[0]
    elif values["metric"] not in task.metrics:
        raise ValueError(
            f"--metric {values['metric']!r} is not one of the {task.name} task's: {', '.join(task.metrics)}"
        )
    cuda_graphs = values["compile"] and compile_mode(values["compile_mode"], _cuda()) == "reduce-overhead"
    if values["pad_to_multiple"] is None and cuda_graphs:  # each batch shape is one CUDA graph: a few shapes
        values["pad_to_multiple"] = CUDA_GRAPH_PAD_MULTIPLE
    resolved = RunSettings(**values).validate()
    check_quantize(resolved.method, resolved.quantize)  # a method without a quantized route, or no bitsandbytes
    try:
        check_adapter(resolved)
    except ValueError as err:  # GoatConfig names its fields; a run names its flags
        raise ValueError(in_flag_terms(str(err))) from None
    scaleout.validate(resolved)
    return Run(resolved, task, given)


# The training budget when --epochs is not given and the family leaves it to the data (text
# classification and regression): enough epochs for MIN_STEPS optimizer steps, at most MAX_EPOCHS, the
# best epoch kept (--select best-epoch). One epoch of a few hundred examples is a few dozen steps: too
# few for any adapter to leave its start, while a linear head on frozen features already fits
# (docs/results/defaults/).
MIN_STEPS, MAX_EPOCHS = 400, 20


def epochs_for_data(train_examples: int, settings: RunSettings) -> int:
    """The epochs that give at least MIN_STEPS optimizer steps on `train_examples` (at most MAX_EPOCHS)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    batch = settings.batch_size * settings.gradient_accumulation_steps * processes
    steps_per_epoch = max(1, math.ceil(train_examples / batch))
    return min(MAX_EPOCHS, max(1, math.ceil(MIN_STEPS / steps_per_epoch)))


def check_rate(given: RunSettings, method: str) -> None:
    """One way to give the learning rate: --lr, or --lr-from-lora for a GOAT method."""
    if given.lr_from_lora is None:
        return
    if given.lr is not None:
        raise ValueError(
            f"--lr {given.lr:g} and --lr-from-lora {given.lr_from_lora:g} both give the learning rate; give one"
        )
    if method not in GOAT_METHODS:
        raise ValueError(
            f"--lr-from-lora {given.lr_from_lora:g} derives a GOAT method's rate; --method {method} takes --lr "
            f"(GOAT methods: {', '.join(GOAT_METHODS)})"
        )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def read_config_file(path: str) -> RunSettings:
    """Settings from `goat train --config FILE` (a run's config.json or a plain JSON object of settings)."""
    saved = read_json(path, "config")
    if isinstance(saved, dict) and isinstance(saved.get("args"), dict):
        saved = saved["args"]
    return RunSettings.from_dict(saved, f"config {path!r}")


def preflight(run: Run, output: str | None = None, overwrite: bool = False) -> TaskData:
    """The run's data, after every check that needs no model, in the order a run meets them;
    engine.run.train(run, ..., data=data) then trains on the data loaded here."""
    check_model_name(run.settings.model)
    if output is not None:
        check_output(output, overwrite)
    return run.task.load_data(run.settings)


# ---- the rows of a comparison ----------------------------------------------------------------------
@dataclass
class Entry:
    """One compared row: a method, or GOAT with one knob changed (--vary)."""

    label: str
    method: str
    overrides: dict = field(default_factory=dict)


@dataclass
class Comparison:
    """What `goat compare` runs: its rows, seeds, learning-rate grids and budget rule, and what the report
    records of how it was asked for (the command, date, machine)."""

    entries: list[Entry]
    seeds: list[int]
    lr_grid: dict[str, list[float]] = field(default_factory=dict)  # label or method -> rates; default DEFAULT_LR_GRID
    budget: str = "params"
    record: dict = field(default_factory=dict)

    @staticmethod
    def row(entry: Entry, base: RunSettings, **changes) -> RunSettings:
        """A row's settings as given: the base with the row's method and overrides (a --lr-from-lora given
        for the comparison reaches GOAT's own methods only), then `changes`."""
        rule = base.lr_from_lora if entry.method in RATE_RULE_METHODS else None
        return base.replace(method=entry.method, lr_from_lora=rule, **entry.overrides).replace(**changes)

    def grid(self, entry: Entry, base: RunSettings | None = None) -> tuple[str, list[float]]:
        """(the knob the row's rates set, the rates): "lr" for a --lr-grid given for the row and for methods
        with a rate of their own; "lr_from_lora" for GOAT's own methods otherwise: LoRA's grid, each rate
        converted by the rate rule, or the one LoRA rate of --lr-from-lora."""
        given = self.lr_grid.get(entry.label) or self.lr_grid.get(entry.method)
        if given:
            return "lr", list(given)
        if entry.method not in RATE_RULE_METHODS:
            return "lr", list(DEFAULT_LR_GRID[entry.method])
        if base is not None and base.lr_from_lora is not None:
            return "lr_from_lora", [base.lr_from_lora]
        return "lr_from_lora", list(DEFAULT_LR_GRID[entry.method])


def plan_entries(methods: list[str], vary: str | None) -> list[Entry]:
    """The methods, then one GOAT variant per value of `vary` ("FIELD=V1,V2,...")."""
    entries = [Entry(check_method(m), m) for m in methods]
    if vary:
        name, values = parse_vary(vary)
        entries += [Entry(f"goat[{name}={value}]", "goat", {name: value}) for value in values]
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--methods / --vary name a row twice: {labels}")
    if not entries:
        raise ValueError("nothing to compare: give --methods and/or --vary")
    return entries


def parse_vary(text: str) -> tuple[str, list]:
    """ "init=goat,principal" -> ("init", ["goat", "principal"]), each value read as the knob's type."""
    written, _, values = text.partition("=")
    name = knob_name(written)  # the flag's spelling works too: rank -> r
    if name is None or not values:
        raise ValueError(
            f"--vary {text!r} must look like FIELD=V1,V2 with FIELD a setting (e.g. init, scaling, top_k, "
            "aux_loss_coef, routing)"
        )
    base, _ = field_type(knob_fields()[name])
    parsed = []
    for value in (v.strip() for v in values.split(",") if v.strip()):
        try:
            parsed.append({"true": True, "false": False}[value.lower()] if base is bool else base(value))
        except (ValueError, KeyError):
            raise ValueError(f"--vary {name}={value!r}: {name} takes {base.__name__} values") from None
    return name, parsed
