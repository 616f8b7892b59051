"""Evaluate the base model without any training: the reference a fine-tuned run is measured against
when no constant prediction tells enough (a decoder has no head to train alone, so `--method head`
does not apply to qa).

    PYTHONPATH=src python scripts/evaluate_base.py --task qa --data quiz-capitals --max-length 64 [--output DIR]

It takes `goat train`'s flags, resolves them the same way (task defaults, seeded splits), builds the
same base model and runs the task's own test evaluation (`engine.run.evaluate_split`), so the figure
is comparable with a run's test metric. With --output it writes metrics.json and, for qa,
predictions.jsonl there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from goat_lora.cli import add_knob_arguments, given_knobs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_knob_arguments(parser, "train")
    parser.add_argument("--output", default=None, help="folder for metrics.json and predictions.jsonl")
    ns = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from goat_lora.engine.folders import write_json, write_jsonl
    from goat_lora.engine import resolve_run
    from goat_lora.engine.run import check_finite_weights
    from goat_lora.tasks.base import Evaluation

    start = time.time()
    run = resolve_run(flags=given_knobs(ns))
    settings, task = run.settings, run.task
    data = task.load_data(settings)
    parts = task.build(settings, data.meta)
    check_finite_weights(parts.model, settings.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts.model.to(device)
    evaluation: Evaluation = task.evaluate(parts.model, data.test, parts, settings, device)
    metrics = {
        "task": task.name,
        "method": "none (the base model)",
        "data": settings.data,
        **{f"test_{k}": v for k, v in evaluation.metrics.items()},
        "constant_baseline": task.constant_baseline(data),
        "num_examples": len(data.test),
        "wall_time_s": time.time() - start,
    }
    print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    if ns.output:
        os.makedirs(ns.output, exist_ok=True)
        write_json(os.path.join(ns.output, "metrics.json"), metrics)
        if evaluation.rows is not None:
            write_jsonl(os.path.join(ns.output, "predictions.jsonl"), evaluation.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
