"""What a user meets with the defaults: `goat train --data D --method M --seed S` and nothing else, on text
tasks the defaults were not chosen on, for GOAT, head-only training and LoRA. Resumable (finished runs
are kept); writes summary.json and summary.md beside the runs.

    .venv/bin/python scripts/defaults_check.py [--out runs/defaults] [--data ucla-subjects trump-tweets]
        [--methods goat head lora] [--seeds 3] [--name summary]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

from goat_lora.report import mean_ci


def run_one(out: str, data: str, method: str, seed: int) -> dict:
    folder = os.path.join(out, "runs", f"{data}-{method}-seed{seed}")
    metrics_path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(metrics_path):
        command = [os.path.join(os.path.dirname(sys.executable), "goat"), "train", "--data", data, "--method", method]
        command += ["--seed", str(seed), "--report-to", "none", "--output", folder, "--overwrite"]
        print(" ".join(command[1:]), flush=True)
        with open(folder + ".log", "w", encoding="utf-8") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    with open(metrics_path, encoding="utf-8") as fh:
        metrics = json.load(fh)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
        args = json.load(fh)["args"]
    return {
        "data": data,
        "method": method,
        "seed": seed,
        "test_accuracy": metrics["test_accuracy"],
        "test_macro_f1": metrics["test_macro_f1"],
        "validation_accuracy": metrics.get("validation_accuracy"),
        "majority": metrics["constant_baseline"]["accuracy"],
        "lr": metrics.get("lr"),
        "lr_rule": metrics.get("lr_rule"),
        "epochs": args["epochs"],
        "selected_epoch": metrics.get("selected_epoch"),
        "steps": metrics.get("steps"),
        "train_time_s": metrics.get("train_time_s"),
        "sizes": metrics.get("sizes"),
    }


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval: report.mean_ci's); half-width nan for one value."""
    ci = mean_ci(values)
    return ci["mean"], ci["ci_high"] - ci["mean"]


def summarize(rows: list[dict], methods: list[str]) -> str:
    lines = [
        "| data | method | test accuracy, mean ± 95% CI | per seed | lr | epochs (chosen) | GOAT − method, paired |",
        "|---|---|---|---|---|---|---|",
    ]
    for data in dict.fromkeys(r["data"] for r in rows):
        by = {
            m: sorted((r for r in rows if r["data"] == data and r["method"] == m), key=lambda r: r["seed"])
            for m in methods
        }
        for method in methods:
            runs = by[method]
            if not runs:
                continue
            mean, half = interval([r["test_accuracy"] for r in runs])
            seeds = ", ".join(f"{r['test_accuracy']:.3f}" for r in runs)
            chosen = ", ".join(f"{r['selected_epoch']:g}" for r in runs)
            paired = "-"
            goat = {r["seed"]: r["test_accuracy"] for r in by.get("goat", [])}
            common = [r for r in runs if r["seed"] in goat]
            if method != "goat" and len(common) >= 2:
                d_mean, d_half = interval([goat[r["seed"]] - r["test_accuracy"] for r in common])
                paired = f"{d_mean:+.3f} ± {d_half:.3f} ({len(common)} seeds)"
            lr = runs[0]["lr"]
            lines.append(
                f"| {data} | {method} | {mean:.3f} ± {half:.3f} | {seeds} | {lr:.3g} | "
                f"{runs[0]['epochs']:g} ({chosen}) | {paired} |"
            )
    majority = {r["data"]: r["majority"] for r in rows}
    lines.append("")
    lines.append("Majority class (test): " + ", ".join(f"{d} {m:.3f}" for d, m in majority.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/defaults")
    p.add_argument("--data", nargs="+", default=["ucla-subjects", "trump-tweets"])
    p.add_argument("--methods", nargs="+", default=["goat", "head", "lora"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--name", default="summary", help="the summary files' name: NAME.json, NAME.md")
    args = p.parse_args(argv)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    rows = []
    for method in args.methods:  # every seed of a method before the next method: GOAT and head-only first
        for data in args.data:
            for seed in range(args.seeds):
                rows.append(run_one(args.out, data, method, seed))
                table = summarize(rows, args.methods)
                summary = {
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                    "command": "python scripts/defaults_check.py " + " ".join(argv or sys.argv[1:]),
                    "runs": rows,
                }
                with open(os.path.join(args.out, f"{args.name}.json"), "w", encoding="utf-8") as fh:
                    json.dump(summary, fh, indent=2)
                with open(os.path.join(args.out, f"{args.name}.md"), "w", encoding="utf-8") as fh:
                    fh.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
