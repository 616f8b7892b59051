"""Reports from run folders: plots for one run, tables and a bar chart for a comparison. No torch here.

  write_run_plots(run_dir)            metrics.json -> loss.png, expert_load.png (layers x experts)
  summarize(results) / write_compare_report(folder, ...)
                                      per-run results -> report.json, report.md, compare.png
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

from .config import atomic_write_bytes, atomic_write_text  # noqa: E402


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
        twin.plot([e["epoch"] * steps_per_epoch for e in epochs], [e[key] for e in epochs], "o--",
                  color="tab:orange", label=f"validation {metric}")  # fmt: skip
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
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: list[dict], lower_is_better: bool = False) -> dict:
    """results: one dict per run with method, lr, seed, validation and test (the compared metric),
    trainable_percent, step_time_s, peak_memory_mb. Per method, the lr with the best mean validation
    value is chosen and its test value reported (mean and std over seeds)."""
    sign = -1.0 if lower_is_better else 1.0
    methods: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        by_lr = {}
        for lr in sorted({r["lr"] for r in runs}):
            at_lr = [r for r in runs if r["lr"] == lr]
            val_mean, val_std = _mean_std([r.get("validation") for r in at_lr])
            test_mean, test_std = _mean_std([r.get("test") for r in at_lr])
            by_lr[lr] = {"validation_mean": val_mean, "validation_std": val_std, "test_mean": test_mean,
                         "test_std": test_std, "seeds": len(at_lr)}  # fmt: skip
        best_lr = max(by_lr, key=lambda lr: -math.inf if math.isnan(by_lr[lr]["validation_mean"])
                      else sign * by_lr[lr]["validation_mean"])  # fmt: skip
        chosen = [r for r in runs if r["lr"] == best_lr]
        methods[method] = {
            "lr": best_lr,
            "test_mean": by_lr[best_lr]["test_mean"],
            "test_std": by_lr[best_lr]["test_std"],
            "validation_mean": by_lr[best_lr]["validation_mean"],
            "seeds": len(chosen),
            "test_values": [r.get("test") for r in chosen],
            "trainable_percent": _mean_std([r.get("trainable_percent") for r in chosen])[0],
            "trainable_params": chosen[0].get("trainable_params"),
            "step_time_s": _mean_std([r.get("step_time_s") for r in chosen])[0],
            "peak_memory_mb": _mean_std([r.get("peak_memory_mb") for r in chosen])[0],
            "wall_time_s": sum(r.get("wall_time_s") or 0.0 for r in runs),
            "router_balance": _mean_std([(r.get("router") or {}).get("balance") for r in chosen])[0],
            "by_lr": {f"{lr:g}": v for lr, v in by_lr.items()},
        }
    return methods


# What a method is called on a quantized base (--quantize): QLoRA and its kin.
QUANTIZED_NAMES = {"lora": "QLoRA", "rslora": "QrsLoRA", "dora": "QDoRA", "pissa": "QPiSSA", "goat": "QGOAT",
                   "goat_mini": "QGOAT-mini", "goat_s": "QGOAT-s", "molora": "QMoLoRA"}  # fmt: skip


def method_label(method: str, quantize: str | None = None) -> str:
    """The name a report shows: the method, or on a quantized base its Q-name (the kind added unless nf4)."""
    if not quantize:
        return method
    return QUANTIZED_NAMES.get(method, method) + ("" if quantize == "nf4" else f" ({quantize})")


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def markdown_table(methods: dict, metric: str = "accuracy", baseline: float | None = None,
                   baseline_name: str = "constant prediction", lower_is_better: bool = False,
                   quantize: str | None = None) -> str:  # fmt: skip
    lines = [
        f"| method | test {metric} (mean ± std) | lr (chosen on validation) | trainable % | step time (s) | peak memory (MB) |",
        "|---|---|---|---|---|---|",
    ]
    finite = [m["test_mean"] for m in methods.values() if not math.isnan(m["test_mean"])]
    best = (min(finite) if lower_is_better else max(finite)) if finite else None
    for name, m in methods.items():
        value = f"{_fmt(m['test_mean'], '.4f')} ± {_fmt(m['test_std'], '.4f')}"
        if best is not None and m["test_mean"] == best:
            value = f"**{value}**"
        lines.append(
            f"| {method_label(name, quantize)} | {value} | {m['lr']:g} | {_fmt(m['trainable_percent'], '.3f')} | "
            f"{_fmt(m['step_time_s'], '.3f')} | {_fmt(m['peak_memory_mb'], '.0f')} |"
        )
    if baseline is not None:
        lines.append(f"\n{baseline_name.capitalize()} ({metric}) on test: {baseline:.4f}.")
    return "\n".join(lines)


def plot_compare(methods: dict, path: str, metric: str = "accuracy", title: str = "",
                 quantize: str | None = None) -> None:  # fmt: skip
    names = list(methods)
    means = [methods[n]["test_mean"] for n in names]
    stds = [methods[n]["test_std"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.75 * len(names) + 2), 4.2))
    colours = ["tab:red" if n.startswith("goat") else "tab:blue" for n in names]
    ax.bar(range(len(names)), means, yerr=stds, color=colours, capsize=3)
    finite = [m for m in means if not math.isnan(m)]
    if finite:
        low = min(m - s for m, s in zip(means, stds) if not math.isnan(m))
        high = max(m + s for m, s in zip(means, stds) if not math.isnan(m))
        pad = 0.1 * (high - low) or 0.05
        ax.set_ylim(low - pad, high + pad)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(
        [f"{method_label(n, quantize)}\n{methods[n]['trainable_percent']:.2f}%\n"
         f"{_fmt(methods[n]['step_time_s'], '.2f')}s/step\n"
         f"{_fmt(methods[n]['peak_memory_mb'], '.0f')}MB" for n in names],  # fmt: skip
        fontsize=7,
    )
    ax.set_ylabel(f"test {metric} (mean ± std over seeds)")
    ax.set_title(title or "goat compare")
    _save_figure(fig, path)


def write_compare_report(folder: str, results: list[dict], settings: dict, baseline: dict | None = None) -> dict:
    """Write report.json, report.md and compare.png into `folder`; return the summary. `settings`
    holds metric, lower_is_better, baseline_name, command, date, machine, data, model, seeds."""
    metric, lower = settings.get("metric", "accuracy"), bool(settings.get("lower_is_better"))
    quantize = settings.get("quantize")
    methods = summarize(results, lower)
    for name, summary in methods.items():
        summary["label"] = method_label(name, quantize)
    report = {"settings": settings, "constant_baseline": baseline, "methods": methods, "runs": results}
    atomic_write_text(os.path.join(folder, "report.json"), json.dumps(report, indent=2, default=str) + "\n")
    reference = (baseline or {}).get(metric)
    text = [
        "# goat compare",
        "",
        f"Command: `{settings.get('command', '')}`",
        f"Date: {settings.get('date', '')}; machine: {settings.get('machine', '')}",
        f"Task: {settings.get('task')}; data: {settings.get('data')}, model: {settings.get('model')}; seeds "
        f"{settings.get('seeds')}; learning rate per method chosen on the validation split (carved from train), "
        f"{metric} reported on test.",
        *([f"Base: the adapted layers quantized {quantize} by bitsandbytes (4-bit: double quantization), one quantizer "
           f"for every method; GOAT quantizes W0 - W_res (QPiSSA's order), QPiSSA its residual W0 - s B A, the others "
           f"W0; adapters, routers and the head in float32."] if quantize else []),
        "",
        markdown_table(methods, metric, reference, settings.get("baseline_name", "constant prediction"), lower,
                       quantize),
        "",
        "![comparison](compare.png)",
        "",
    ]
    atomic_write_text(os.path.join(folder, "report.md"), "\n".join(text))
    plot_compare(methods, os.path.join(folder, "compare.png"), metric, title=f"{settings.get('data')}: test {metric}",
                 quantize=quantize)
    return methods
