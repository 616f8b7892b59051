"""Reports from run folders: plots for one run, tables and a bar chart for a comparison. No torch here.

write_run_plots(run_dir)            metrics.json -> loss.png, expert_load.png (layers x experts)
summarize(results) / write_compare_report(folder, ...)
                                    per-run results -> report.json, report.md, compare.png, rates.png
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .files import atomic_write_bytes, atomic_write_text  # noqa: E402
from .tasks.base import better  # noqa: E402


def _save_figure(fig, path: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ---- routing -------------------------------------------------------------------------------------
def router_statistics(load: dict[str, list[float]]) -> dict:
    """Summaries of a layer -> per-expert fraction table.

    balance: mean over layers of the normalised entropy of the load (1 = every expert used equally,
    0 = one expert takes everything); max_share: the largest fraction any expert got in any layer;
    unused_experts: (layer, expert) pairs that received under 1% of the tokens."""
    if not load:
        return {}
    entropies, max_share, unused = [], 0.0, 0
    for fractions in load.values():
        E = len(fractions)
        h = -sum(p * math.log(p) for p in fractions if p > 0)
        entropies.append(h / math.log(E) if E > 1 else 1.0)
        max_share = max(max_share, max(fractions))
        unused += sum(1 for p in fractions if p < 0.01)
    return {
        "balance": sum(entropies) / len(entropies),
        "max_share": max_share,
        "unused_experts": unused,
        "layers": len(load),
    }


# ---- one run ------------------------------------------------------------------------------------
def plot_loss(metrics: dict, path: str) -> None:
    """Training loss per logged step, with the validation metric per epoch on a second axis."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    logged = metrics.get("train_loss") or []
    if logged:
        ax.plot([h["step"] for h in logged], [h["loss"] for h in logged], color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    metric = metrics.get("metric", "accuracy")
    key = f"validation_{metric}"
    epochs = [e for e in metrics.get("per_epoch_eval") or [] if e.get(key) is not None]
    if epochs and metrics.get("steps") and logged:
        steps_per_epoch = metrics["steps"] / max(e["epoch"] for e in epochs)
        twin = ax.twinx()
        twin.plot(
            [e["epoch"] * steps_per_epoch for e in epochs],
            [e[key] for e in epochs],
            "o--",
            color="tab:orange",
            label=f"validation {metric}",
        )
        twin.set_ylabel(f"validation {metric}")
    title = f"{metrics.get('method', '')}"
    if metrics.get(f"test_{metric}") is not None:
        title += f"  test {metric} {metrics[f'test_{metric}']:.3f}"
    ax.set_title(title)
    _save_figure(fig, path)


def plot_expert_load(load: dict[str, list[float]], path: str, title: str = "expert load") -> None:
    """Heatmap: one row per adapted layer, one column per expert, colour = fraction of tokens."""
    names = list(load)
    height = max(2.5, 0.18 * len(names) + 1.2)
    fig, ax = plt.subplots(figsize=(6.4, height))
    if names:
        rows = [load[n] for n in names]
        image = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0.0)
        fig.colorbar(image, ax=ax, label="fraction of tokens")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([_short(n) for n in names], fontsize=5 if len(names) > 30 else 7)
        ax.set_xticks(range(len(rows[0])))
        ax.set_xlabel("expert")
    else:
        ax.text(0.5, 0.5, "no router in this method", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(title)
    _save_figure(fig, path)


def _short(name: str) -> str:
    for prefix in ("base_model.model.", "bert.encoder.", "model.layers.", "backbone._blocks.", "backbone."):
        name = name.replace(prefix, "")
    return name.replace("layer.", "L").replace("attention.", "att.")


def write_run_plots(run_dir: str) -> None:
    metrics = _read_json(os.path.join(run_dir, "metrics.json"))
    if "train_loss" in metrics:
        plot_loss(metrics, os.path.join(run_dir, "loss.png"))
    plot_expert_load(
        metrics.get("expert_load") or {},
        os.path.join(run_dir, "expert_load.png"),
        title=f"{metrics.get('method', '')}: fraction of test tokens per expert",
    )


# ---- comparisons --------------------------------------------------------------------------------
def _finite(values) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean_ci(values: list[float], level: float = 0.95) -> dict:
    """Mean, sample standard deviation and the two-sided `level` confidence interval of the mean
    (Student's t with n - 1 degrees of freedom); with one value the interval is unknown (NaN)."""
    from scipy import stats

    values = _finite(values)
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def summarize(
    results: list[dict], lower_is_better: bool = False, reference: str | None = None, baseline: float | None = None
) -> dict:
    """Per row label (method or GOAT variant), from one result per (label, lr, seed) holding the
    compared metric on validation and test:

    - each seed picks the lr with the best validation value (ties: the first in the grid); that run's
      test value is the seed's result: mean, std and 95% CI over seeds;
    - the paired difference to `reference` per seed (reference - method when higher is better, so a
      positive difference means the reference won), its mean and 95% CI, and win / tie / loss counts;
    - `per_rate`: the test mean and 95% CI over seeds at every rate tried (not a choice: a curve);
    - `flagged` when no run of the row, at any lr and seed, beat `baseline` (the best constant
      prediction) on test: such a row never learnt the task at the rates tried.
    """
    rows: dict[str, dict] = {}
    chosen_test: dict[str, dict[int, float]] = {}
    for label in dict.fromkeys(r.get("label", r["method"]) for r in results):
        runs = [r for r in results if r.get("label", r["method"]) == label]
        per_seed = []
        for seed in dict.fromkeys(r["seed"] for r in runs):
            candidates = [r for r in runs if r["seed"] == seed]
            best = candidates[0]
            for run in candidates[1:]:
                if better(run.get("validation"), best.get("validation"), lower_is_better):
                    best = run
            per_seed.append(
                {
                    "seed": seed,
                    "lr": best["lr"],
                    "epoch": best.get("selected_epoch"),
                    "validation": best.get("validation"),
                    "test": best.get("test"),
                }
            )
        chosen_test[label] = {p["seed"]: p["test"] for p in per_seed}
        per_rate = []  # every rate tried, over its seeds: how wide the row's good band is
        for lr in sorted({r["lr"] for r in runs}):
            at_rate = [r for r in runs if r["lr"] == lr]
            test_at = mean_ci([r.get("test") for r in at_rate])
            per_rate.append(
                {
                    "lr": lr,
                    "test_mean": test_at["mean"],
                    "test_ci": [test_at["ci_low"], test_at["ci_high"]],
                    "validation_mean": mean_ci([r.get("validation") for r in at_rate])["mean"],
                    "seeds": test_at["n"],
                }
            )
        chosen = [r for r in runs if (r["seed"], r["lr"]) in {(p["seed"], p["lr"]) for p in per_seed}]
        test = mean_ci([p["test"] for p in per_seed])
        rows[label] = {
            "method": runs[0]["method"],
            "rank": runs[0].get("rank"),
            "trainable_params": runs[0].get("trainable_params"),
            "trainable_percent": runs[0].get("trainable_percent"),
            "test_mean": test["mean"],
            "test_std": test["std"],
            "test_ci": [test["ci_low"], test["ci_high"]],
            "seeds": test["n"],
            "per_seed": per_seed,
            "per_rate": per_rate,
            "flagged": baseline is not None and not any(better(r.get("test"), baseline, lower_is_better) for r in runs),
            "step_time_s": statistics.fmean(_finite([r.get("step_time_s") for r in chosen]) or [float("nan")]),
            "peak_memory_mb": statistics.fmean(_finite([r.get("peak_memory_mb") for r in chosen]) or [float("nan")]),
            "wall_time_s": sum(r.get("wall_time_s") or 0.0 for r in runs),
            "router_balance": statistics.fmean(
                _finite([(r.get("router") or {}).get("balance") for r in chosen]) or [float("nan")]
            ),
        }
    if reference in rows:
        sign = -1.0 if lower_is_better else 1.0
        for label, row in rows.items():
            if label == reference:
                continue
            pairs = [
                (chosen_test[reference][s], chosen_test[label][s])
                for s in chosen_test[label]
                if s in chosen_test[reference]
            ]
            diffs = [sign * (a - b) for a, b in pairs if _finite([a, b]) == [a, b]]
            stats_ = mean_ci(diffs)
            row["vs_reference"] = {
                "reference": reference,
                "mean": stats_["mean"],
                "ci": [stats_["ci_low"], stats_["ci_high"]],
                "wins": sum(d > 0 for d in diffs),
                "ties": sum(d == 0 for d in diffs),
                "losses": sum(d < 0 for d in diffs),
                "per_seed": diffs,
            }
    return rows


# What a method is called on a quantized base (--quantize): QLoRA and its kin.
QUANTIZED_NAMES = {
    "lora": "QLoRA",
    "rslora": "QrsLoRA",
    "dora": "QDoRA",
    "pissa": "QPiSSA",
    "goat": "QGOAT",
    "goat_mini": "QGOAT-mini",
    "goat_s": "QGOAT-s",
    "molora": "QMoLoRA",
}


def method_label(method: str, quantize: str | None = None) -> str:
    """The name a report shows: the method, or on a quantized base its Q-name (the kind added unless nf4)."""
    if not quantize:
        return method
    return QUANTIZED_NAMES.get(method, method) + ("" if quantize == "nf4" else f" ({quantize})")


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def markdown_table(
    rows: dict,
    metric: str = "accuracy",
    lower_is_better: bool = False,
    reference: str | None = None,
    baseline: float | None = None,
    baseline_name: str = "constant prediction",
    quantize: str | None = None,
) -> str:
    """One line per row label (its Q-name on a quantized base): rank and trainable parameters, test
    mean ± std and 95% CI, the paired difference to the reference (positive: the reference was better)
    with win / tie / loss, and each seed's chosen lr and epoch."""
    lines = [
        f"| method | rank | trainable | test {metric} (mean ± std) | 95% CI | {reference or 'reference'} − method "
        "(paired, 95% CI) | W/T/L | lr / epoch per seed | step (s) | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    finite = [r["test_mean"] for r in rows.values() if not r["flagged"] and _finite([r["test_mean"]])]
    best = (min(finite) if lower_is_better else max(finite)) if finite else None
    for label, r in rows.items():
        value = f"{_fmt(r['test_mean'], '.4f')} ± {_fmt(r['test_std'], '.4f')}"
        if best is not None and r["test_mean"] == best and not r["flagged"]:
            value = f"**{value}**"
        if r["flagged"]:
            value += " ⚑"
        ci = f"[{_fmt(r['test_ci'][0], '.4f')}, {_fmt(r['test_ci'][1], '.4f')}]"
        vs = r.get("vs_reference")
        diff = (
            "—"
            if vs is None
            else f"{_fmt(vs['mean'], '+.4f')} [{_fmt(vs['ci'][0], '+.4f')}, {_fmt(vs['ci'][1], '+.4f')}]"
        )
        wtl = "—" if vs is None else f"{vs['wins']}/{vs['ties']}/{vs['losses']}"
        seeds = ", ".join(f"{p['lr']:.3g}/{_fmt(p['epoch'], 'g')}" for p in r["per_seed"])
        rank = "exempt" if r["rank"] is None else str(r["rank"])
        trainable = f"{r['trainable_params']:,}" if r.get("trainable_params") is not None else "-"
        lines.append(
            f"| {method_label(label, quantize)} | {rank} | {trainable} | {value} | {ci} | {diff} | {wtl} | {seeds} | "
            f"{_fmt(r['step_time_s'], '.3f')} | {_fmt(r['peak_memory_mb'], '.0f')} |"
        )
    if baseline is not None:
        lines.append(f"\n{baseline_name.capitalize()} ({metric}) on test: {baseline:.4f}.")
    if any(r["flagged"] for r in rows.values()):
        lines.append(
            f"⚑ never beat the {baseline_name} on test at any learning rate and seed tried: it did not "
            "learn the task here; its mean is shown but not ranked."
        )
    return "\n".join(lines)


def _error_bars(means: list[float], intervals: list[list[float]]) -> tuple[list[float], list[float]]:
    """matplotlib's (below, above) lengths from each mean's [low, high] interval; 0 where it is unknown."""
    low = [m - ci[0] if _finite([ci[0]]) else 0.0 for m, ci in zip(means, intervals)]
    high = [ci[1] - m if _finite([ci[1]]) else 0.0 for m, ci in zip(means, intervals)]
    return low, high


def plot_compare(rows: dict, path: str, metric: str = "accuracy", title: str = "", quantize: str | None = None) -> None:
    names = list(rows)
    means = [rows[n]["test_mean"] for n in names]
    low, high = _error_bars(means, [rows[n]["test_ci"] for n in names])
    fig, ax = plt.subplots(figsize=(max(6.4, 0.8 * len(names) + 2), 4.4))
    colours = ["tab:gray" if rows[n]["flagged"] else "tab:red" if n.startswith("goat") else "tab:blue" for n in names]
    ax.bar(range(len(names)), [m if _finite([m]) else 0.0 for m in means], yerr=[low, high], color=colours, capsize=3)
    finite = [(m - lo, m + hi) for m, lo, hi in zip(means, low, high) if _finite([m])]
    if finite:
        bottom, top = min(a for a, _ in finite), max(b for _, b in finite)
        pad = 0.1 * (top - bottom) or 0.05
        ax.set_ylim(bottom - pad, top + pad)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(
        [f"{method_label(n, quantize)}\n{_fmt(rows[n]['trainable_percent'], '.2f')}%" for n in names],
        fontsize=7,
        rotation=30,
    )
    ax.set_ylabel(f"test {metric} (mean, 95% CI over seeds)")
    ax.set_title(title or "goat compare")
    _save_figure(fig, path)


def plot_rates(rows: dict, path: str, metric: str = "accuracy", title: str = "", quantize: str | None = None) -> None:
    """Test metric against learning rate, one line per row (mean and 95% CI over seeds at each rate):
    where each method works, not only its best point. A row given LoRA rates (--lr-from-lora) is drawn
    at the rates it ran, the rule's."""
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for label, row in rows.items():
        curve = [p for p in row.get("per_rate") or [] if _finite([p["test_mean"]])]
        if not curve:
            continue
        rates, means = [p["lr"] for p in curve], [p["test_mean"] for p in curve]
        low, high = _error_bars(means, [p["test_ci"] for p in curve])
        style = "-" if label.startswith("goat") else "--"
        ax.errorbar(
            rates,
            means,
            yerr=[low, high],
            fmt=style + "o",
            capsize=3,
            markersize=4,
            label=method_label(label, quantize),
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (each row's own grid)")
    ax.set_ylabel(f"test {metric} (mean, 95% CI over seeds)")
    ax.set_title(title or "goat compare: test metric against learning rate")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save_figure(fig, path)


def write_compare_report(folder: str, results: list[dict], settings: dict, baseline: dict | None = None) -> dict:
    """Write report.json, report.md and compare.png (and rates.png where a row tried several rates)
    into `folder`; return the summary. `settings` holds metric, lower_is_better, reference,
    baseline_name, budget, select, command, date, machine."""
    metric, lower = settings.get("metric", "accuracy"), bool(settings.get("lower_is_better"))
    reference_value = (baseline or {}).get(metric)
    rows = summarize(results, lower, settings.get("reference"), reference_value)
    quantize = settings.get("quantize")
    for label, row in rows.items():
        row["label"] = method_label(label, quantize)
    report = {"settings": settings, "constant_baseline": baseline, "methods": rows, "runs": results}
    atomic_write_text(os.path.join(folder, "report.json"), json.dumps(report, indent=2, default=str) + "\n")
    text = [
        "# goat compare",
        "",
        f"Command: `{settings.get('command', '')}`",
        f"Date: {settings.get('date', '')}; machine: {settings.get('machine', '')}",
        f"Task: {settings.get('task')}; data: {settings.get('data')}; model: {settings.get('model')}; seeds "
        f"{settings.get('seeds')}; budget: {settings.get('budget', 'rank')} (ranks chosen so trainable parameters are "
        f"within 10% of GOAT's; full and head exempt); epochs: {settings.get('select', 'last')}; each seed picks its "
        f"learning rate on the validation split (carved from train); {metric} reported on test.",
        *(
            [
                f"Base: the adapted layers quantized {quantize} by bitsandbytes (4-bit: double quantization), one "
                f"quantizer for every method; GOAT quantizes W0 - W_res (QPiSSA's order), QPiSSA its residual "
                f"W0 - s B A, the others W0; adapters, routers and the head in float32."
            ]
            if quantize
            else []
        ),
        "",
        markdown_table(
            rows,
            metric,
            lower,
            settings.get("reference"),
            reference_value,
            settings.get("baseline_name", "constant prediction"),
            quantize,
        ),
        "",
        "![comparison](compare.png)",
        "",
    ]
    several_rates = any(len(row["per_rate"]) > 1 for row in rows.values())
    if several_rates:
        text += [
            f"Test {metric} at every learning rate tried (mean and 95% CI over seeds): how wide each row's good "
            "band is.",
            "",
            "![rates](rates.png)",
            "",
        ]
    atomic_write_text(os.path.join(folder, "report.md"), "\n".join(text))
    plot_compare(
        rows,
        os.path.join(folder, "compare.png"),
        metric,
        title=f"{settings.get('data')}: test {metric}",
        quantize=quantize,
    )
    if several_rates:
        title = f"{settings.get('data')}: test {metric} against learning rate"
        plot_rates(rows, os.path.join(folder, "rates.png"), metric, title=title, quantize=quantize)
    return rows


# ---- a study: several comparisons in the paper's form ---------------------------------------------
def study_table(reports: dict[str, dict], methods: list[str] | None = None) -> str:
    """Methods as rows, tasks as columns (each `goat compare` report.json: test mean ± std of its
    metric, the column's best in bold, ⚑ where the method never beat the constant prediction), and the
    average over tasks of the means, as the paper's tables are laid out. A method that did not run on
    every task (head-only has no qa column) is averaged over the tasks it ran, and says how many."""
    tasks = list(reports)
    rows = methods or list(dict.fromkeys(label for r in reports.values() for label in r["methods"]))
    best = {}
    for name in tasks:
        lower = bool(reports[name]["settings"].get("lower_is_better"))
        means = _finite([row["test_mean"] for row in reports[name]["methods"].values()])
        best[name] = (min if lower else max)(means) if means else None
    header = [f"{name} ({reports[name]['settings']['metric']})" for name in tasks]
    lines = ["| method | " + " | ".join(header) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
    for label in rows:
        cells, means = [], []
        for name in tasks:
            row = reports[name]["methods"].get(label)
            if row is None:
                cells.append("—")
                continue
            value = f"{_fmt(row['test_mean'], '.4f')} ± {_fmt(row['test_std'], '.4f')}"
            if row["test_mean"] == best[name]:
                value = f"**{value}**"
            cells.append(value + (" ⚑" if row["flagged"] else ""))
            means.append(row["test_mean"])
        average = _fmt(statistics.fmean(_finite(means)), ".4f") if _finite(means) else "-"
        if len(means) < len(tasks):
            average += f" ({len(means)} of {len(tasks)} tasks)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines)


def _epochs_trained(settings: dict) -> float | None:
    """How many epochs each run of a comparison trained: `goat compare` records it (`epochs`) since
    2026-12-02; older reports hold it only where it was given on the command line."""
    return settings.get("epochs", (settings.get("given") or {}).get("epochs"))


def best_epoch_table(reports: dict[str, dict]) -> str:
    """Per task, how often the best validation epoch came before the last: over every run, over the
    run each seed chose, and per method (a method counts when most of its chosen runs did). Selecting
    the best epoch only means something when training has flattened out, so a budget where most
    runs peak at their last epoch is too short."""
    lines = [
        "| task | epochs | runs best before their last epoch | chosen runs (one per method and seed) | "
        "methods whose chosen runs mostly were |",
        "|---|---|---|---|---|",
    ]
    for name, rep in reports.items():
        epochs = _epochs_trained(rep["settings"])
        if epochs is None:
            lines.append(f"| {name} | ? | - | - | - |")
            continue
        runs = [r for r in rep["runs"] if r.get("selected_epoch") is not None]
        early = sum(r["selected_epoch"] < epochs for r in runs)
        chosen = {
            label: [p for p in row["per_seed"] if p.get("epoch") is not None] for label, row in rep["methods"].items()
        }
        chosen_early = {label: sum(p["epoch"] < epochs for p in seeds) for label, seeds in chosen.items()}
        n_chosen = sum(len(seeds) for seeds in chosen.values())
        mostly = sum(2 * chosen_early[label] > len(seeds) for label, seeds in chosen.items())
        lines.append(
            f"| {name} | {epochs:g} | {early} of {len(runs)} | {sum(chosen_early.values())} of {n_chosen} | "
            f"{mostly} of {len(chosen)} |"
        )
    return "\n".join(lines)


def rate_table(report: dict) -> str:
    """One comparison's rows at every rate tried: test mean ± 95% CI half-width over seeds, the
    validation mean, and how many seeds chose that rate on validation."""
    metric = report["settings"].get("metric", "accuracy")
    lines = [
        f"| row | lr | seeds | test {metric} (mean ± 95% CI) | validation | chosen by |",
        "|---|---|---:|---|---:|---:|",
    ]
    for label, row in report["methods"].items():
        chosen = [p["lr"] for p in row["per_seed"]]
        for point in row.get("per_rate") or []:
            half = (point["test_ci"][1] - point["test_ci"][0]) / 2 if _finite(point["test_ci"]) else None
            test = f"{_fmt(point['test_mean'], '.4f')} ± {_fmt(half, '.4f')}"
            validation, picks = _fmt(point["validation_mean"], ".4f"), chosen.count(point["lr"])
            lines.append(f"| {label} | {point['lr']:.3g} | {point['seeds']} | {test} | {validation} | {picks} |")
    return "\n".join(lines)


USAGE = (
    "usage: python -m goat_lora.report study NAME=path/to/report.json ...\n"
    "       python -m goat_lora.report rates path/to/report.json"
)


def main(argv: list[str] | None = None) -> int:
    """`python -m goat_lora.report study NAME=REPORT.json ...`: print the study table and where each
    task's runs had their best epoch. `... rates REPORT.json`: one comparison at every rate tried."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "rates":
        print(rate_table(_read_json(args[1])))
        return 0
    if not args or args[0] != "study":
        print(USAGE, file=sys.stderr)
        return 2
    reports = {}
    for item in args[1:]:
        name, _, path = item.partition("=")
        reports[name] = _read_json(path)
    print(study_table(reports))
    print()
    print(best_epoch_table(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
