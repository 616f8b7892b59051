"""The `goat` command line: train, eval, compare, bench, inspect.

    goat train                          MiniLM + Fine Foods reviews with GOAT (r 8, 8 experts, top-2)
    goat train --method lora --data reviews.csv --text-column review --label-column score
    goat eval --adapter runs/RUN        reload a run and evaluate it on its test split or --data
    goat compare --methods goat lora    methods x seeds x a small lr grid -> report.md / .json / .png
    goat bench ...                      speed and memory of the GOAT layer (goat_lora.bench)
    goat inspect [--model M]            which layers GOAT adapts, their shapes and scales

Bad input (missing file or column, empty data, a single class, unknown method, a model that does
not load) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit code 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _add_run_arguments(p: argparse.ArgumentParser, method: bool = True) -> None:
    """Knobs shared by every method: data, model, schedule and budget."""
    from .baselines import METHODS

    if method:
        p.add_argument("--method", default="goat", help=f"one of: {', '.join(METHODS)} (default goat)")
    p.add_argument("--model", default=None, help="local path or hub name; default the shipped MiniLM "
                   "('minilm'; 'smollm2' is shipped too; images use EfficientNet-Lite0)")  # fmt: skip
    p.add_argument("--data", default="finefoods", help="finefoods | fashion-mnist | a .csv/.jsonl/.parquet file | "
                   "a datasets hub name (needs network)")  # fmt: skip
    p.add_argument("--text-column", default="text", help="text column of a user file (default text)")
    p.add_argument("--label-column", default="label", help="label column of a user file (default label)")
    p.add_argument("--test-data", default=None, help="test file; otherwise a seeded 20%% split of --data")
    p.add_argument("--rank", type=int, default=8, help="total LoRA rank r (GOAT: over all experts; default 8)")
    p.add_argument("--experts", type=int, default=8, help="number of experts E (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token k (default 2)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: per method, goat 3e-4)")
    p.add_argument("--epochs", type=float, default=None, help="epochs (default 1 text, 2 images)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 16 text, 32 images)")
    p.add_argument("--max-length", type=int, default=None, help="max tokens per text (default 96)")
    p.add_argument("--train-size", type=int, default=None,
                   help="training examples (default 2400 Fine Foods, 3000 Fashion-MNIST, all of a user file; 0 all)")  # fmt: skip
    p.add_argument("--test-size", type=int, default=None, help="test examples (default all; 1000 Fashion-MNIST)")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, init and data order (default 0)")
    p.add_argument("--aux-loss-coef", type=float, default=1e-3, help="load-balancing loss coefficient (default 1e-3)")
    p.add_argument("--logging-steps", type=int, default=10, help="log the training loss every N steps")
    # scale-out and ecosystem (goat_lora.scaleout / causal_lm; docs/scaling.md)
    p.add_argument("--task", default="classification", choices=("classification", "causal-lm"),
                   help="classification (default) or causal-lm (a decoder, default smollm2, on --data instructions or "
                   "a .jsonl/.csv with --text-column)")  # fmt: skip
    p.add_argument("--mask-prompt", action="store_true", help="causal-lm: no loss on the prompt (rows with a response field)")
    p.add_argument("--dropout", type=float, default=0.05, help="experts' dropout (default 0.05)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="sequential data order (runs with N processes then see the same global batches)")  # fmt: skip
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing (use_reentrant=False)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU or GPU); adapters stay float32")
    p.add_argument("--report-to", default="tensorboard",
                   help="tensorboard (default, RUN/tensorboard), wandb, both comma-separated, or none")  # fmt: skip
    p.add_argument("--deepspeed", default=None, metavar="CONFIG", help="DeepSpeed config (GPU), e.g. configs/ds_zero2.json")
    p.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="layers to adapt: names, name suffixes (query value) or one regex (default every Linear but the head)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _train_args(ns: argparse.Namespace):
    from .train import TrainArgs

    return TrainArgs(
        method=getattr(ns, "method", "goat"),
        model=ns.model,
        data=ns.data,
        text_column=ns.text_column,
        label_column=ns.label_column,
        test_data=ns.test_data,
        rank=ns.rank,
        experts=ns.experts,
        top_k=ns.top_k,
        lr=ns.lr,
        epochs=ns.epochs,
        batch_size=ns.batch_size,
        max_length=ns.max_length,
        train_size=ns.train_size,
        test_size=ns.test_size,
        seed=ns.seed,
        aux_loss_coef=ns.aux_loss_coef,
        logging_steps=ns.logging_steps,
        target_modules=ns.target_modules,
        save_steps=getattr(ns, "save_steps", 0),  # goat compare: no checkpoints
        task=getattr(ns, "task", "classification"),
        mask_prompt=getattr(ns, "mask_prompt", False),
        dropout=getattr(ns, "dropout", 0.05),
        shuffle=getattr(ns, "shuffle", True),
        gradient_checkpointing=getattr(ns, "gradient_checkpointing", False),
        bf16=getattr(ns, "bf16", False),
        report_to=getattr(ns, "report_to", "tensorboard"),
        deepspeed=getattr(ns, "deepspeed", None),
    )


# ---- subcommands --------------------------------------------------------------------------------
def cmd_train(ns: argparse.Namespace) -> int:
    """Fine-tune a model with GOAT or a baseline; print test accuracy and the run folder.

    With no arguments: the shipped MiniLM on the shipped Fine Foods reviews, GOAT with the paper's
    defaults (r 8, 8 experts, top-2, s = sqrt(3 n / d)), about 3 minutes on 2 idle CPU cores."""
    from .resume import read_config_file, resume
    from .train import train

    args = _train_args(ns)
    if ns.resume:  # a run killed after a checkpoint: its saved settings, its output folder
        metrics = resume(ns.resume, overwrite=ns.overwrite)
    else:
        if ns.config:
            args = read_config_file(ns.config)
        metrics = train(args, ns.output, overwrite=ns.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun / accelerate: rank 0 reports (and wrote the folder)
        return 0
    if metrics.get("task") == "causal-lm":
        from .causal_lm import summary_line

        print(summary_line(metrics))
        print(f"run folder: {metrics['output']}")
        return 0
    print(
        f"test accuracy {metrics['test_accuracy']:.4f} (majority class {metrics['majority_accuracy']:.4f}) | "
        f"{metrics['method']} | trainable {metrics['trainable_params']:,d} params "
        f"({metrics['trainable_percent']:.2f}%) | {metrics['wall_time_s']:.0f} s"
    )
    print(f"run folder: {metrics['output']}")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    """Reload a saved run onto its base model and evaluate it: on the run's own test split, or on
    --data (a built-in task or a file with the same labels). Writes metrics.json and expert_load.png."""
    from .train import run_eval

    metrics = run_eval(
        ns.adapter, ns.data, ns.output, text_column=ns.text_column, label_column=ns.label_column,
        batch_size=ns.batch_size, overwrite=ns.overwrite,
    )  # fmt: skip
    print(f"test accuracy {metrics['test_accuracy']:.4f} on {metrics['num_examples']} examples | {metrics['method']}")
    print(f"eval folder: {metrics['output']}")
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    """Compare methods: each method x learning rate (a small grid, picked on a validation split
    carved from train) x seed; report test accuracy mean +- std, trainable %, step time and peak
    memory in report.md, report.json and compare.png."""
    from .baselines import DEFAULT_LR_GRID, check_method
    from .train import compare

    if getattr(ns, "task", "classification") != "classification":
        raise ValueError("goat compare compares classifiers; --task causal-lm runs one at a time with goat train")
    methods = ns.methods
    for method in methods:
        check_method(method)
    grid = None
    if ns.lrs:
        grid = {m: list(ns.lrs) for m in methods}
    elif ns.lr is not None:
        grid = {m: [ns.lr] for m in methods}
    if ns.lr_grid:
        grid = dict(grid or {})
        for item in ns.lr_grid:
            method, _, values = item.partition("=")
            check_method(method)
            try:
                grid[method] = [float(v) for v in values.split(",") if v]
            except ValueError:
                raise ValueError(f"--lr-grid {item!r} must look like METHOD=LR,LR (e.g. goat=1e-3,3e-3)") from None
            if not grid[method]:
                raise ValueError(f"--lr-grid {item!r} gives no learning rate")
    seeds = list(range(ns.seed, ns.seed + ns.seeds))
    output = ns.output or os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-compare")
    settings = {
        "command": "goat " + " ".join(sys.argv[1:]) if ns.command_line is None else ns.command_line,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
        "methods": methods,
        "seeds": seeds,
        "lr_grid": {m: list((grid or {}).get(m) or DEFAULT_LR_GRID[m]) for m in methods},
        "data": ns.data,
        "model": ns.model,
        "train_size": ns.train_size,
        "max_length": ns.max_length,
        "epochs": ns.epochs,
    }
    if ns.resume and not ns.output:
        raise ValueError("--resume needs the interrupted comparison's --output")
    summary = compare(methods, _train_args(ns), output, seeds=seeds, lr_grid=grid, overwrite=ns.overwrite,
                      settings=settings, resume=ns.resume)  # fmt: skip
    from .report import markdown_table

    print(markdown_table(summary))
    print(f"report: {os.path.join(os.path.abspath(output), 'report.md')}")
    return 0


def cmd_inspect(ns: argparse.Namespace) -> int:
    """Show which layers GOAT would adapt in a model (shapes, scale s, parameters), or summarise a
    run folder given as --run."""
    import json

    if ns.run:
        path = os.path.join(ns.run, "metrics.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{ns.run!r} is not a run folder: {path!r} is missing")
        with open(path, encoding="utf-8") as fh:
            metrics = json.load(fh)
        keys = ("method", "test_accuracy", "validation_accuracy", "trainable_params", "trainable_percent",
                "wall_time_s", "step_time_s", "peak_memory_mb", "router")  # fmt: skip
        for key in keys:
            print(f"{key:>20}: {metrics.get(key)}")
        return 0
    from . import functional as F
    from . import hf
    from .config import GoatConfig
    from .inject import find_target_modules
    from .layer import layer_shape

    if ns.model and ns.model.lower() == hf.EFFICIENTNET_LITE0:
        model, head = hf.load_image_classifier(ns.model, 10), ["classifier"]
        targets = hf.image_target_modules(model)
    else:
        try:
            model = hf.load_sequence_classifier(ns.model, 2)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"model {ns.model!r} could not be loaded: {str(err).splitlines()[0] if str(err) else err}") from None
        head = hf.default_modules_to_save(model)
        targets = None
    config = GoatConfig(r=ns.rank, num_experts=ns.experts, top_k=ns.top_k, modules_to_save=head or None,
                        target_modules=targets or "all-linear")  # fmt: skip
    names = find_target_modules(model, config)
    added = 0
    print(f"{'layer':<60} {'out x in':>12} {'s':>8}")
    for name in names:
        m, n = layer_shape(model.get_submodule(name))
        s = F.scaling_factor(config.scaling, n, config.expert_rank, config.eta, config.lora_alpha)
        added += config.r * (m + n) + config.num_experts * n
        print(f"{name:<60} {f'{m} x {n}':>12} {s:>8.2f}")
    total = sum(p.numel() for p in model.parameters())
    print(f"{len(names)} layers; GOAT adds {added:,d} trainable parameters ({100 * added / total:.2f}% of {total:,d})"
          f" plus the head {head}")  # fmt: skip
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    """Speed and memory of the GOAT layer against the per-expert loop and LoRA (goat_lora.bench)."""
    run_bench = getattr(ns, "_run_bench", None)
    if run_bench is None:
        print("goat bench is not available yet (goat_lora.bench is missing)", file=sys.stderr)
        return 1
    return int(run_bench(ns) or 0)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; goat_lora.bench is imported only when the command is `bench` (it is heavier)."""
    parser = _Parser(prog="goat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the goat-lora version")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("train", help="fine-tune with GOAT or a baseline", description=cmd_train.__doc__)
    _add_run_arguments(p)
    p.add_argument("--output", default=None, help="run folder (default runs/<timestamp>-<method>)")
    p.add_argument("--config", default=None, help="rerun: the config.json of an earlier run (other flags ignored)")
    p.add_argument("--save-steps", type=int, default=500,
                   help="checkpoint every N steps in the hidden staging folder, for --resume (default 500; 0 none)")  # fmt: skip
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a killed run (its --output) from its last checkpoint (other flags ignored)")  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved run", description=cmd_eval.__doc__)
    p.add_argument("--adapter", required=True, help="a run folder written by goat train")
    p.add_argument("--data", default=None, help="finefoods | fashion-mnist | a file (default: the run's test split)")
    p.add_argument("--text-column", default=None, help="text column of --data (default: the run's)")
    p.add_argument("--label-column", default=None, help="label column of --data (default: the run's)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--output", default=None, help="where to write metrics (default RUN/eval-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="compare methods over seeds and a lr grid", description=cmd_compare.__doc__)
    from .baselines import METHODS

    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"methods to compare (default all: {' '.join(METHODS)})")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3, starting at --seed)")
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="one learning-rate grid for every method (default: a 2-value grid per method)")  # fmt: skip
    p.add_argument("--lr-grid", nargs="+", default=None, metavar="METHOD=LR,LR",
                   help="per-method grids, e.g. goat=1e-3,3e-3 full=1e-4 (others keep their default grid)")  # fmt: skip
    p.add_argument("--output", default=None, help="report folder (default runs/<timestamp>-compare)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted comparison (same command and --output): finished runs are reused")  # fmt: skip
    p.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    _add_run_arguments(p, method=False)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="benchmark the GOAT layer", description=cmd_bench.__doc__)
    wants_bench = argv is not None and "bench" in argv
    try:
        if not wants_bench:
            raise ImportError("not needed for this command")
        from .bench import add_bench_arguments, run_bench
    except ImportError:
        p.set_defaults(func=cmd_bench, _run_bench=None)
    else:
        add_bench_arguments(p)
        p.set_defaults(func=cmd_bench, _run_bench=run_bench)

    p = sub.add_parser("inspect", help="show the layers GOAT adapts", description=cmd_inspect.__doc__)
    p.add_argument("--model", default=None, help="local path or hub name (default the shipped MiniLM)")
    p.add_argument("--run", default=None, help="a run folder: print its metrics summary instead")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.set_defaults(func=cmd_inspect)
    return parser


def _offline_by_default(ns: argparse.Namespace) -> None:
    """Shipped models and built-in data need no hub: stay offline (fast, no network timeouts)
    unless the user set HF_HUB_OFFLINE, or names something that is neither shipped nor local."""
    if "HF_HUB_OFFLINE" in os.environ:
        return
    shipped = {None, "minilm", "smollm2", "efficientnet-lite0", "all-minilm-l6-v2"}
    model = getattr(ns, "model", None)
    data = getattr(ns, "data", None)
    model_local = model is None or model.lower() in shipped or os.path.exists(model)
    data_local = data is None or data in ("finefoods", "fashion-mnist", "instructions") or os.path.exists(data) or "." in os.path.basename(data)
    if model_local and data_local:
        os.environ["HF_HUB_OFFLINE"] = "1"


def _prefer_passive_openmp() -> None:
    """Idle OpenMP threads should sleep, not spin: on a shared CPU, spinning threads made every
    training step several times slower (measured 11 s against 1.5 s a step on 2 busy cores).
    OpenMP reads OMP_WAIT_POLICY once, when torch loads; `import goat_lora` does not load torch, so
    setting it here, before any command runs, is enough. A value the user set wins. If torch is
    already loaded (main() called from a program that imported it) it is too late and nothing changes."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    _prefer_passive_openmp()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    ns = parser.parse_args(argv)
    if ns.version:
        from . import __version__

        print(__version__)
        return 0
    if not getattr(ns, "command", None):
        parser.print_help()
        return 0
    _offline_by_default(ns)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # "Loading weights" bars would bury a one-line error
        logging.getLogger("peft").setLevel(logging.ERROR)
    except ImportError:
        pass
    import signal

    def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so staging folders are removed
        raise KeyboardInterrupt

    if hasattr(signal, "SIGTERM"):
        try:
            signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread
            pass
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"goat {ns.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # the machine, not the input: disk full, I/O error (exit 1, still one line)
        print(f"goat {ns.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"goat {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
