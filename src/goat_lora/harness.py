"""Scoring a run with lm-evaluation-harness: `goat eval --adapter RUN --harness TASK [TASK ...]`.

The run's model is reloaded as `goat eval` reloads it (engine.load_run: base model + adapter, no SVD)
and handed to lm-eval already built, `HFLM(pretrained=model, tokenizer=...)`, so the harness scores
the very model `goat eval` evaluates. Tasks are lm-eval's own names (those need their data sets from
the hub) or YAML tasks of your own over local files in `--harness-include DIR` (examples/harness/).
Writes harness.json (lm-eval's results per task) into the output folder and prints lm-eval's table.
lm-eval is an optional extra: pip install 'goat-lora[eval]'.

lm-eval's own command line loads adapters through peft (`--model hf --model_args
pretrained=BASE,peft=RUN/adapter`), which knows GOAT only after register_with_peft(); so

    python -m goat_lora.harness --model hf --model_args pretrained=BASE,peft=RUN/adapter --tasks ...

is lm-eval's command line with that registration done first.
"""

from __future__ import annotations

import json
import os
import time

EXTRA_HINT = "pip install 'goat-lora[eval]'"


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ValueError(f"--harness needs lm-evaluation-harness, which is not installed: {EXTRA_HINT}") from None
    return lm_eval


def evaluate_model(
    model, tokenizer, tasks: list[str], *, include: str | None = None, limit: int | None = None, batch_size: int = 8
) -> dict:
    """lm-eval's results for an already built causal LM (a GoatModel, a PeftModel, a plain transformers model):
    the dict simple_evaluate returns ("results", "versions", "n-shot", ...)."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if include is not None and not os.path.isdir(include):
        raise FileNotFoundError(f"--harness-include {include!r} is not a folder")
    # indexing lm-eval's own 14,684 tasks took 72 s on 2 CPU cores (7 s for one folder): only when needed
    manager = TaskManager(include_path=include, include_defaults=False) if include is not None else None
    if manager is None or any(name not in manager.all_tasks for name in tasks):
        manager = TaskManager(include_path=include)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        where = (
            f"lm-eval's tasks or those in {include!r}" if include else "lm-eval's tasks (yours: --harness-include DIR)"
        )
        raise ValueError(f"--harness task(s) {unknown} are not among {where}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False)


def harness_eval(run_dir: str, output: str | None = None, *, overrides: dict, overwrite: bool = False) -> dict:
    """`goat eval --adapter RUN --harness ...`: reload the run, score it with lm-eval, write harness.json to
    `output` (default RUN/harness-<time>). Returns {"results", "table", "output", ...}."""
    require_lm_eval()
    from .engine import load_run
    from .engine.folders import building_run_folder, check_output, write_json

    model, parts, run = load_run(run_dir)
    import torch

    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # as evaluate_run; HFLM uses model.device
    settings = run.settings.replace(**{k: v for k, v in overrides.items() if v is not None and k != "data"}).validate()
    get_head = getattr(model, "get_output_embeddings", None)
    if parts.tokenizer is None or not callable(get_head) or get_head() is None:
        raise ValueError(
            f"--harness scores language models (a decoder with its tokenizer); run {run_dir!r} holds a "
            f"{type(getattr(model, 'base_model', model)).__name__}"
        )
    output = output or os.path.join(run_dir, f"harness-{time.strftime('%Y%m%d-%H%M%S')}")
    check_output(output, overwrite)
    start = time.time()
    results = evaluate_model(
        model,
        parts.tokenizer,
        settings.harness,
        include=settings.harness_include,
        limit=settings.harness_limit,
        batch_size=settings.eval_batch_size,
    )
    from lm_eval.utils import make_table

    summary = {
        "run": os.path.abspath(run_dir),
        "method": settings.method,
        "tasks": settings.harness,
        "include": os.path.abspath(settings.harness_include) if settings.harness_include else None,
        "limit": settings.harness_limit,
        "results": results["results"],
        "n-shot": results.get("n-shot"),
        "versions": results.get("versions"),
        "n-samples": results.get("n-samples"),
        "wall_time_s": time.time() - start,
    }
    with building_run_folder(output, main_process=True, replace=overwrite) as staging:
        write_json(os.path.join(staging, "harness.json"), json.loads(json.dumps(summary, default=str)))
    return {**summary, "table": make_table(results), "output": os.path.abspath(output)}


def main() -> None:
    """lm-eval's command line, with GOAT adapters known to peft (see the module docstring)."""
    require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    from .peft_integration import register_with_peft

    register_with_peft()
    cli_evaluate()


if __name__ == "__main__":
    main()
