"""A run's settings resolved and its inputs checked, before anything heavy is imported.

    resolve_settings(settings)               fill the knobs left at None (task defaults, method presets), validate
    read_config_file(path)                   the settings of `--config FILE`
    preflight(settings, output, overwrite)   resolved settings, the task and its data, the output checked
    plan_entries(methods, vary)              the rows of `goat compare` (methods, then GOAT variants)

This module imports the settings, the task families and the method registry only (no Trainer, no peft,
no bitsandbytes): a missing data file, a bad column or an unusable --output is refused in one line
before a model or the quantization stack is loaded (engine.run does that afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import scaleout
from ..hf import check_model_name
from ..methods import GOAT_METHODS, check_method, check_quantize, method_defaults
from ..settings import CUDA_GRAPH_PAD_MULTIPLE, RunSettings, compile_mode, field_type, knob_fields
from ..tasks import get_task
from ..tasks.base import Task, TaskData
from .folders import check_output, read_json


def resolve_settings(settings: RunSettings) -> tuple[RunSettings, Task]:
    """(settings with every None filled in, the task): the task's defaults, then the method's
    (learning rate, GOAT init and scaling, LoRA alpha) and the task's first metric; then every
    check, one line each."""
    settings.validate()
    task = get_task(settings.task)
    check_method(settings.method)
    values = settings.to_dict()
    for key, value in [*task.defaults(settings).items(), *method_defaults(settings).items()]:
        if values.get(key) is None:
            values[key] = value
    if values["metric"] is None:
        values["metric"] = task.metrics[0]
    elif values["metric"] not in task.metrics:
        raise ValueError(f"--metric {values['metric']!r} is not one of the {task.name} task's: {', '.join(task.metrics)}")
    cuda_graphs = values["compile"] and compile_mode(values["compile_mode"], _cuda()) == "reduce-overhead"
    if values["pad_to_multiple"] is None and cuda_graphs:  # each batch shape is one CUDA graph: a few shapes
        values["pad_to_multiple"] = CUDA_GRAPH_PAD_MULTIPLE
    resolved = RunSettings(**values).validate()
    check_quantize(resolved.method, resolved.quantize)  # a method without a quantized route, or no bitsandbytes
    if resolved.method in GOAT_METHODS:  # HydraLoRA's experts share one A of the full rank: any rank will do
        if resolved.rank % resolved.experts:
            raise ValueError(f"--rank {resolved.rank} must be divisible by --experts {resolved.experts}")
        routed = resolved.experts - (resolved.routing == "shared")
        if resolved.top_k > routed:
            raise ValueError(f"--top-k {resolved.top_k} must be <= --experts {resolved.experts}"
                             + (" - 1 with --routing shared (one expert is shared)" if routed < resolved.experts else ""))  # fmt: skip
    scaleout.validate(resolved)
    return resolved, task


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def read_config_file(path: str) -> RunSettings:
    """Settings from `goat train --config FILE` (a run's config.json or a plain JSON object of settings)."""
    saved = read_json(path, "config")
    if isinstance(saved, dict) and isinstance(saved.get("args"), dict):
        saved = saved["args"]
    return RunSettings.from_dict(saved, f"config {path!r}")


def preflight(settings: RunSettings, output: str | None = None, overwrite: bool = False) -> tuple[RunSettings, Task, TaskData]:
    """(resolved settings, task, the task's data): every check that needs no model, in the order a
    run meets them; engine.run.train(..., data=data) then trains on the data loaded here."""
    settings, task = resolve_settings(settings)
    check_model_name(settings.model)
    if output is not None:
        check_output(output, overwrite)
    return settings, task, task.load_data(settings)


# ---- the rows of a comparison ----------------------------------------------------------------------
@dataclass
class Entry:
    """One compared row: a method, or GOAT with one knob changed (--vary)."""

    label: str
    method: str
    overrides: dict = field(default_factory=dict)


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
    """"init=goat,principal" -> ("init", ["goat", "principal"]), each value read as the knob's type."""
    name, _, values = text.partition("=")
    name = name.strip().replace("-", "_")
    fields = knob_fields()
    if name not in fields or not values:
        raise ValueError(f"--vary {text!r} must look like FIELD=V1,V2 with FIELD a setting (e.g. init, scaling, top_k, "
                         "aux_loss_coef, routing)")  # fmt: skip
    base, _ = field_type(fields[name])
    parsed = []
    for value in (v.strip() for v in values.split(",") if v.strip()):
        try:
            parsed.append({"true": True, "false": False}[value.lower()] if base is bool else base(value))
        except (ValueError, KeyError):
            raise ValueError(f"--vary {name}={value!r}: {name} takes {base.__name__} values") from None
    return name, parsed
