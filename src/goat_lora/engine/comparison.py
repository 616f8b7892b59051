"""`goat compare`: methods x learning rates x seeds on one task, any family.

Every run of a seed sees the same data splits (loaded once per seed). Per method, the learning rate
with the best mean validation value of the compared metric (--metric) is chosen, and its test value
is reported (mean, std over seeds) in report.md, report.json and compare.png, with each run's
metrics.json under runs/<method>-lr<lr>-seed<seed>/.

The comparison is built in the hidden staging folder `.NAME.partial`, and each finished run's
metrics.json lands there as it finishes. If the comparison is interrupted or killed, the folder
stays; `resume=True` (`goat compare ... --resume`, same settings and output) reuses the finished
runs and trains only the others. Without it, a stale folder with finished runs is moved aside to
`NAME.failed-<time>` rather than deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from ..baselines import DEFAULT_LR_GRID, check_method, check_quantize
from ..settings import RunSettings
from .folders import check_output, publish, staging_folder, staging_path, write_json
from .run import resolve_settings, train

COMPARE_PLAN = "compare_plan.json"


def compare(methods: list[str], base: RunSettings, output: str, *, seeds: list[int],
            lr_grid: dict[str, list[float]] | None = None, overwrite: bool = False, settings: dict | None = None,
            log=print, resume: bool = False) -> dict:  # fmt: skip
    from ..report import write_compare_report

    for method in methods:
        check_method(method)
    check_quantize(methods, base.quantize)  # names every method without a quantized route, before any run
    check_output(output, overwrite)
    grids = {m: list((lr_grid or {}).get(m) or DEFAULT_LR_GRID[m]) for m in methods}
    _, task = resolve_settings(base.replace(method=methods[0]))  # the task and its checks, before any run
    plan = {"methods": list(methods), "seeds": list(seeds), "base": base.to_dict(), "lr_grid": grids}
    staging = _compare_staging(output, plan, resume)
    results: list[dict] = []
    data_by_seed: dict[int, object] = {}
    try:
        total, done = sum(len(g) for g in grids.values()) * len(seeds), 0
        metric = None
        for method in methods:
            for lr in grids[method]:
                for seed in seeds:
                    args, task = resolve_settings(base.replace(method=method, lr=lr, seed=seed))
                    metric = args.metric
                    if seed not in data_by_seed:  # the same seeded splits for every method
                        data_by_seed[seed] = task.load_data(args)
                    run_name = f"{method}-lr{lr:g}-seed{seed}"
                    run_dir = os.path.join(staging, "runs", run_name)
                    finished = os.path.join(run_dir, "metrics.json")
                    if os.path.isfile(finished):  # done before an interruption (only with resume)
                        with open(finished, encoding="utf-8") as fh:
                            metrics = json.load(fh)
                    else:
                        metrics = train(args, run_dir, quiet=True, save_weights=False, plots=False,
                                        data=data_by_seed[seed])  # fmt: skip
                    done += 1
                    row = {k: metrics.get(k) for k in ("method", "trainable_params", "trainable_percent",
                                                        "step_time_s", "peak_memory_mb", "wall_time_s", "router")}  # fmt: skip
                    row.update(validation=metrics.get(f"validation_{metric}"), test=metrics.get(f"test_{metric}"),
                               test_metrics={k[5:]: v for k, v in metrics.items() if k.startswith("test_")},
                               lr=lr, seed=seed, run=f"runs/{run_name}")  # fmt: skip
                    results.append(row)
                    log(f"[{done}/{total}] {method:<9} lr={lr:<7g} seed={seed}  validation {metric} "
                        f"{_fmt(row['validation'])}  test {_fmt(row['test'])}  ({row['wall_time_s']:.0f} s)")  # fmt: skip
                    # a partial report after every run: a long comparison can be read while it runs
                    write_json(os.path.join(staging, "results.partial.json"), {"runs": results})
        first = data_by_seed[seeds[0]]
        report_settings = {**(settings or {}), "task": task.name, "metric": metric, "baseline_name": task.baseline_name,
                           "lower_is_better": metric in task.lower_is_better}  # fmt: skip
        summary = write_compare_report(staging, results, report_settings, task.constant_baseline(first))
        for name in ("results.partial.json", COMPARE_PLAN):
            os.unlink(os.path.join(staging, name))
        publish(staging, output)
    except BaseException:
        if results:  # keep finished runs for --resume, never under the final name
            log(f"goat compare: {len(results)} finished run(s) kept in {staging}; "
                "run the same command with --resume to continue")  # fmt: skip
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


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
