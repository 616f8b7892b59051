"""`goat compare`: methods (and GOAT variants) x learning rates x seeds on one task, fair by construction.

    budget   --budget params (default): every adapter's rank is chosen so that its trainable parameter
             count is within 10% of GOAT's at --rank (full fine-tuning and head-only are exempt and
             marked); --budget rank: every method at --rank.
    epochs   --select best-epoch (default): each run is validated after every epoch and tested at its
             best epoch (the paper's protocol); --select last: the last epoch.
    lr       each seed picks, per method, the learning rate of its grid with the best validation value
             of --metric; that run's test value is the seed's result.
    seeds    every method sees the same data splits and data order for a given seed, so GOAT's
             difference to a method is paired per seed (report.summarize: mean, 95% CI, win/tie/loss).
    vary     --vary FIELD=V1,V2,... adds GOAT variants under the same protocol (the paper's ablations:
             init, scaling, top_k, aux_loss_coef, routing), labelled goat[FIELD=V].

Writes report.md, report.json, compare.png and rates.png (test metric against each row's rates), and
each run's metrics.json under runs/<label>-lr<lr>-seed<seed>/. The comparison is built in the hidden
staging folder `.NAME.partial`; an interrupted comparison keeps its finished runs there and `resume=True`
(same settings and output) trains only the others. Without it, a stale folder with finished runs is moved
aside to `NAME.failed-<time>` rather than deleted.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time

from ..methods import GOAT_METHODS, check_quantize, count_parameters, prepare_model
from ..settings import RunSettings
from .folders import check_output, publish, staging_folder, staging_path, write_json
from .resolve import Comparison, Entry, epochs_for_data, resolve_run
from .run import Writing, train

COMPARE_PLAN = "compare_plan.json"
BUDGETS = ("params", "rank")
EXEMPT = ("full", "head")  # no rank to choose: marked in the report
BUDGET_TOLERANCE = 0.10


# ---- equal budgets ------------------------------------------------------------------------------
def trainable_count(parts, settings: RunSettings, method: str, rank: int) -> int:
    """Trainable parameters of `method` at `rank` on a copy of the task's base model. Initialisations
    that cost an SVD are replaced by one with the same parameters (GOAT's by zero-init, PiSSA's and
    MiLoRA's by LoRA's): the count does not depend on them."""
    proxy = {"goat": "molora", "goat_mini": "molora", "goat_s": "molora", "pissa": "lora", "milora": "lora"}.get(
        method, method
    )
    # alpha, init and scale change no count; fixed values keep every proxy buildable
    trial = settings.replace(method=proxy, r=rank, lora_alpha=2.0 * rank, init="zero", scaling="alpha")
    model = prepare_model(proxy, copy.deepcopy(parts.model), trial, parts.targets, parts.head)
    return count_parameters(model)[0]


def param_budget(entries: list[Entry], settings: RunSettings, task, meta: dict, budget: str) -> dict[str, dict]:
    """label -> {"rank", "trainable_params", "exempt", "within_budget"}: under budget "params" every
    adapter's rank is the one whose trainable count is nearest GOAT's at settings.r (counts are
    linear in the rank, so two counts give the line); GOAT-family rows keep settings.r."""
    if budget not in BUDGETS:
        raise ValueError(f"--budget {budget!r} is not allowed; choose one of {', '.join(BUDGETS)}")
    parts = task.build(settings, meta)
    target = trainable_count(parts, settings, "goat", settings.r)
    plan = {}
    for entry in entries:
        entry_settings = settings.replace(**entry.overrides)
        if entry.method in EXEMPT:
            count = trainable_count(parts, entry_settings, entry.method, entry_settings.r)
            plan[entry.label] = {"rank": None, "trainable_params": count, "exempt": True, "within_budget": None}
            continue
        rank = entry_settings.r
        if budget == "params" and entry.method not in GOAT_METHODS:
            one, two = (trainable_count(parts, entry_settings, entry.method, r) for r in (1, 2))
            slope = max(two - one, 1)
            guess = max(1, round(1 + (target - one) / slope))
            rank = min((max(1, guess + d) for d in (-1, 0, 1)), key=lambda r: abs(one + (r - 1) * slope - target))
        count = trainable_count(parts, entry_settings, entry.method, rank)
        plan[entry.label] = {
            "rank": rank,
            "trainable_params": count,
            "exempt": False,
            "within_budget": abs(count - target) <= BUDGET_TOLERANCE * target,
        }
    plan["_goat_target"] = {"trainable_params": target}
    return plan


# ---- the comparison -----------------------------------------------------------------------------
def compare(
    comparison: Comparison, base: RunSettings, output: str, *, overwrite: bool = False, resume: bool = False, log=print
) -> dict:
    """Run the comparison on `base` (the settings as given: engine.given_settings), each row resolved
    with its method, rank, learning rate and seed; write the report folder; return the summary."""
    from ..report import write_compare_report

    entries, seeds, budget = comparison.entries, comparison.seeds, comparison.budget
    check_quantize([e.method for e in entries], base.quantize)  # names every method without a quantized route
    check_output(output, overwrite)
    grids = {e.label: comparison.grid(e, base) for e in entries}  # label -> (the knob its rates set, rates)

    def row(entry: Entry, knob: str, rate: float, **changes) -> RunSettings:
        other = "lr_from_lora" if knob == "lr" else "lr"
        return comparison.row(entry, base, **{knob: rate, other: None}, **changes)

    first = resolve_run(comparison.row(entries[0], base))
    data_by_seed = {seeds[0]: first.task.load_data(first.settings.replace(seed=seeds[0]))}
    ranks = param_budget(entries, first.settings, first.task, data_by_seed[seeds[0]].meta, budget)
    plan = {
        "entries": [e.__dict__ for e in entries],
        "seeds": list(seeds),
        "base": base.to_dict(),
        "lr_grid": {label: rates for label, (_, rates) in grids.items()},
        "rate_knob": {label: knob for label, (knob, _) in grids.items()},
        "budget": budget,
    }
    for entry in entries:  # every row's settings checked before the first run starts
        knob, rates = grids[entry.label]
        for rate in rates:
            resolve_run(row(entry, knob, rate, r=ranks[entry.label]["rank"] or base.r))
    staging = _compare_staging(output, plan, resume)
    results: list[dict] = []
    quiet = Writing(quiet=True, save_weights=False, plots=False)
    try:
        total, done = sum(len(rates) for _, rates in grids.values()) * len(seeds), 0
        for entry in entries:
            rank = ranks[entry.label]["rank"] or base.r
            knob, rates = grids[entry.label]
            for rate in rates:
                for seed in seeds:
                    run = resolve_run(row(entry, knob, rate, r=rank, seed=seed))
                    args = run.settings
                    if seed not in data_by_seed:  # the same seeded splits (and data order) for every method
                        data_by_seed[seed] = run.task.load_data(args)
                    rate_name = f"lr{rate:g}" if knob == "lr" else f"from-lora{rate:g}"
                    name = f"{entry.label}-{rate_name}-seed{seed}".replace("[", "_").replace("]", "").replace("=", "-")
                    run_dir = os.path.join(staging, "runs", name)
                    finished = os.path.join(run_dir, "metrics.json")
                    if os.path.isfile(finished):  # done before an interruption (only with resume)
                        with open(finished, encoding="utf-8") as fh:
                            metrics = json.load(fh)
                    else:
                        metrics = train(run, run_dir, data=data_by_seed[seed], writing=quiet)
                    done += 1
                    row_result = {
                        k: metrics.get(k)
                        for k in (
                            "method",
                            "trainable_params",
                            "trainable_percent",
                            "step_time_s",
                            "peak_memory_mb",
                            "wall_time_s",
                            "router",
                            "selected_epoch",
                        )
                    }
                    row_result.update(
                        label=entry.label,
                        rank=rank if entry.method not in EXEMPT else None,
                        lr=metrics.get("lr") or rate,  # the rate trained with (the rate rule's for lr_from_lora)
                        lr_from_lora=rate if knob == "lr_from_lora" else None,
                        seed=seed,
                        validation=metrics.get(f"validation_{args.metric}"),
                        test=metrics.get(f"test_{args.metric}"),
                        test_metrics={k[5:]: v for k, v in metrics.items() if k.startswith("test_")},
                        run=f"runs/{name}",
                    )
                    results.append(row_result)
                    log(
                        f"[{done}/{total}] {entry.label:<22} lr={row_result['lr']:<7.3g} seed={seed}  "
                        f"validation {args.metric} "
                        f"{_fmt(row_result['validation'])}  test {_fmt(row_result['test'])}  epoch "
                        f"{row_result['selected_epoch']}  ({row_result['wall_time_s']:.0f} s)"
                    )
                    # a partial report after every run: a long comparison can be read while it runs
                    write_json(os.path.join(staging, "results.partial.json"), {"runs": results})
        task, chosen = first.task, first.settings
        report_settings = {
            **comparison.record,
            "task": task.name,
            "data": chosen.data,
            "model": chosen.model,
            "metric": chosen.metric,
            "budget": budget,
            "epochs": chosen.epochs or epochs_for_data(len(data_by_seed[seeds[0]].train), chosen),
            "select": chosen.select,
            "baseline_name": task.baseline_name,
            "lower_is_better": chosen.metric in task.lower_is_better,
            "reference": "goat" if "goat" in grids else entries[0].label,
            "ranks": ranks,
        }
        summary = write_compare_report(
            staging, results, report_settings, task.constant_baseline(data_by_seed[seeds[0]])
        )
        for name in ("results.partial.json", COMPARE_PLAN):
            os.unlink(os.path.join(staging, name))
        publish(staging, output, replace=overwrite)
    except BaseException:
        if results:  # keep finished runs for --resume, never under the final name
            log(
                f"goat compare: {len(results)} finished run(s) kept in {staging}; "
                "run the same command with --resume to continue"
            )
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


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
        saved.setdefault("rate_knob", {label: "lr" for label in saved.get("lr_grid", {})})  # older: rates were lr
        if isinstance(saved.get("base"), dict):  # written by an older version: its names and knobs as today's
            base = RunSettings.from_dict(saved["base"], plan_path).to_dict()
            saved["base"] = json.loads(json.dumps(base, default=str))
        if saved != plan:
            differing = sorted(_differing(saved, plan))
            raise ValueError(
                f"--resume: the interrupted comparison in {staging!r} ran other settings "
                f"(differing: {', '.join(differing)}); use the same command, or drop --resume"
            )
        return staging
    if os.path.isdir(os.path.join(staging, "runs")) and os.listdir(os.path.join(staging, "runs")):
        os.replace(staging, f"{os.path.abspath(output)}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
    staging = staging_folder(output, shared=True)
    write_json(plan_path, plan)
    return staging


def _differing(saved: dict, plan: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ, a nested dict's as `outer.inner`, so a refused --resume names the
    setting that changed, not only the section it is in."""
    names = []
    for key in sorted(set(saved) | set(plan)):
        old, new = saved.get(key), plan.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            names += _differing(old, new, f"{prefix}{key}.")
        elif old != new:
            names.append(f"{prefix}{key}")
    return names


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
