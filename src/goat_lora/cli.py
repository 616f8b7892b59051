"""The `goat` command line: train, eval, compare, bench, inspect.

    goat train                          MiniLM + Fine Foods reviews with GOAT (r 8, 8 experts, top-2)
    goat train --task regression --data tate
    goat train --method lora --data pairs.csv --text-column sentence1 --text-pair-column sentence2
    goat eval --adapter runs/RUN        reload a run and evaluate it on its test split or --data
    goat eval --adapter runs/RUN --harness TASK   ... or with lm-evaluation-harness tasks (goat-lora[eval])
    goat compare --methods goat lora    methods x seeds x a small lr grid -> report.md / .json / .png
    goat bench ...                      speed and memory of the GOAT layer (goat_lora.bench)
    goat inspect [--model M]            which layers GOAT adapts, their shapes and scales

The run flags are generated from goat_lora.settings.RunSettings, where each knob is declared once.
Bad input (missing file or column, empty data, a single class, unknown method, a model that does
not load) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import sys
import time

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit code 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


# ---- what the libraries say --------------------------------------------------------------------
class LibraryOutput(logging.Handler):
    """Everything the libraries log (and Python warnings, through logging.captureWarnings) while a
    command runs, kept off the console so that an error stays the last and only line on stderr:
    transformers, peft, bitsandbytes and kernels print notes at import or load time whose wording
    changes from version to version. With --verbose each record goes to stderr as it arrives.
    After a command that wrote a folder, the records are kept there as library.log and one line
    says how many there were; after one that wrote none, one line says how many were not shown."""

    FILE = "library.log"

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []
        self.verbose = False
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def install(self, verbose: bool) -> None:
        self.verbose = verbose
        root = logging.getLogger()
        if self not in root.handlers:
            root.addHandler(self)
        root.setLevel(min(root.level or logging.WARNING, logging.WARNING))
        logging.captureWarnings(True)
        try:  # transformers logs through its own stderr handler; send its records here instead
            import transformers

            transformers.logging.set_verbosity_warning()
            transformers.logging.disable_default_handler()
            transformers.logging.enable_propagation()
            transformers.logging.disable_progress_bar()  # "Loading weights" bars would bury a one-line error
        except ImportError:
            pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a library's malformed log call must not end the command
            text = f"{record.levelname} {record.name}: {record.msg!r}"
        if self.verbose:
            print(text, file=sys.stderr)
        elif len(self.records) < 10_000:
            self.records.append(text)

    def keep_in(self, folder: str) -> None:
        """Write the records so far to FOLDER/library.log and say so in one line (nothing when none)."""
        if not self.records or not os.path.isdir(folder):
            return
        from .files import atomic_write_text

        path = os.path.join(folder, self.FILE)
        atomic_write_text(path, "".join(f"{line}\n" for line in self.records))
        print(f"note: {len(self.records)} library warning(s) kept in {path} (--verbose prints them as they come)")
        self.records = []

    def mention_the_rest(self) -> None:
        """After a command that wrote no folder (inspect, bench): one line on how many records there were."""
        if self.records:
            print(f"note: {len(self.records)} library warning(s) not shown (--verbose prints them)")
            self.records = []


_LIBRARY_OUTPUT = LibraryOutput()


# ---- the knobs, from their one declaration ------------------------------------------------------
def add_knob_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """One flag per RunSettings field that belongs to `command`. Defaults are SUPPRESSed, so the
    namespace holds only the flags given, which then override --config and the defaults."""
    from .settings import field_type, flag, knob_fields

    for name, spec in knob_fields().items():
        meta = spec.metadata
        if command not in meta["commands"]:
            continue
        base, _ = field_type(spec)
        text = meta["help"].replace("%", "%%")  # argparse formats help with %
        if spec.default is not None and spec.default != [] and base is not bool:
            text += f" (default {spec.default:g})" if isinstance(spec.default, float) else f" (default {spec.default})"
        kwargs = {"dest": name, "default": argparse.SUPPRESS, "help": text}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base is list:
            kwargs.update(nargs="+", metavar=meta["metavar"] or name.upper())
        else:
            kwargs["type"] = base
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
        parser.add_argument(flag(name), **kwargs)


def given_knobs(ns: argparse.Namespace) -> dict:
    from .settings import knob_fields

    return {name: value for name, value in vars(ns).items() if name in knob_fields()}


def _at_least_one(text: str) -> int:
    """argparse type of a count that must be >= 1 (its message becomes "argument --seeds: ...")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ---- subcommands --------------------------------------------------------------------------------
def cmd_train(ns: argparse.Namespace) -> int:
    """Fine-tune a model with GOAT or a baseline on any task family; print the test metrics and the run folder.

    With no arguments: the shipped MiniLM on the shipped Fine Foods reviews, GOAT with the paper's
    defaults (r 8, 8 experts, top-2, s = sqrt(3 n / d)), its rate from LoRA's by the rate rule, 3 epochs
    (400 steps at least); an epoch took about 2 minutes on 2 idle CPU cores."""
    from .engine import preflight, resolve_run

    if ns.print_config:
        print(json.dumps(resolve_run(flags=given_knobs(ns), config=ns.config).settings.to_dict(), indent=2))
        return 0
    if getattr(ns, "recipe", None):
        from .recipes import recipe_note

        print(f"recipe {ns.recipe}: {recipe_note(ns.recipe)}", file=sys.stderr)
    if ns.resume:  # a run killed after a checkpoint: its saved settings, its output folder
        from .engine import resume

        metrics = resume(ns.resume, overwrite=ns.overwrite)
    else:  # settings, data and --output are checked before the model, peft or bitsandbytes load
        run = resolve_run(flags=given_knobs(ns), config=ns.config)
        data = preflight(run, ns.output, ns.overwrite)
        from .engine import Writing, train

        metrics = train(run, ns.output, data=data, writing=Writing(overwrite=ns.overwrite))
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun / accelerate: rank 0 reports (and wrote the folder)
        return 0
    from .engine import summary_line

    print(summary_line(metrics))
    if metrics.get("data_note"):
        print(f"note: {metrics['data_note']}")
    print(f"run folder: {metrics['output']}")
    _LIBRARY_OUTPUT.keep_in(metrics["output"])
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    """Reload a saved run (any task family, also runs of goat-lora 0.1.0) onto its base model and
    evaluate it: on the run's own test split, or on --data (a built-in data set, a file, a hub data
    set with the run's classes). Writes metrics.json (the run's metric names), predictions.jsonl
    where the task generates, and expert_load.png. With --harness: lm-evaluation-harness tasks instead
    (decoders; harness.json)."""
    from .engine import evaluate_run
    from .report import method_label
    from .tasks import get_task

    given = given_knobs(ns)
    if given.get("harness"):
        from .harness import harness_eval

        summary = harness_eval(ns.adapter, ns.output, overrides=given, overwrite=ns.overwrite)
        print(summary["table"].rstrip())
        print(f"eval folder: {summary['output']}")
        _LIBRARY_OUTPUT.keep_in(summary["output"])
        return 0
    if given.get("harness_include") or given.get("harness_limit"):
        raise ValueError("--harness-include and --harness-limit need --harness TASK")
    metrics = evaluate_run(ns.adapter, ns.output, overrides=given, overwrite=ns.overwrite)
    task = get_task(metrics["task"])
    metric = metrics["metric"]
    others = [
        f"{name} {metrics[f'test_{name}']:.4f}" for name in task.metrics if name != metric and f"test_{name}" in metrics
    ]
    print(
        f"test {metric} {metrics[f'test_{metric}']:.4f} on {metrics['num_examples']} examples | "
        + "".join(f"{text}, " for text in others)
        + method_label(metrics["method"], metrics.get("quantize"))
    )
    if (metrics["eval_source"] or {}).get("note"):
        print(f"note: {metrics['eval_source']['note']}")
    print(f"eval folder: {metrics['output']}")
    _LIBRARY_OUTPUT.keep_in(metrics["output"])
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    """Compare methods (and GOAT variants, --vary) on any task family, fair by construction: equal
    trainable parameters (--budget params), each run tested at its best validation epoch (--select
    best-epoch), each seed's learning rate picked on validation from a per-method grid, the same data
    per seed for every method. report.md / report.json / compare.png: mean ± std and 95% CI over
    seeds, GOAT's paired difference and win / tie / loss, the lr and epoch each seed chose, and a flag
    on methods that never beat the best constant prediction; rates.png: the test metric at every rate
    tried."""
    from .methods import METHODS
    from .engine.resolve import Comparison, given_settings, plan_entries, preflight, resolve_run
    from .report import markdown_table

    methods = ns.methods if ns.methods is not None else ([] if ns.vary else list(METHODS))
    entries = plan_entries(methods, ns.vary)
    grid: dict[str, list[float]] = {}
    if ns.lrs:
        grid = {e.label: list(ns.lrs) for e in entries}
    elif "lr" in vars(ns):
        grid = {e.label: [ns.lr] for e in entries}
    for item in ns.lr_grid or []:
        name, _, values = item.rpartition("=")  # a row label holds "=" too: goat[scaling=alpha]=1e-3,3e-3
        if name not in {e.label for e in entries} | set(METHODS):
            raise ValueError(f"--lr-grid {item!r}: {name!r} is neither a compared method nor a row label")
        try:
            grid[name] = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise ValueError(f"--lr-grid {item!r} must look like METHOD=LR,LR (e.g. goat=1e-3,3e-3)") from None
        if not grid[name]:
            raise ValueError(f"--lr-grid {item!r} gives no learning rate")
    base = given_settings(flags={**given_knobs(ns), "save_steps": 0}, config=ns.config)  # no checkpoints inside
    seeds = list(range(base.seed, base.seed + ns.seeds))
    output = ns.output or os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-compare")
    if ns.resume and not ns.output:
        raise ValueError("--resume needs the interrupted comparison's --output")
    comparison = Comparison(entries, seeds, grid, ns.budget)
    grids = {e.label: comparison.grid(e, base) for e in entries}  # label -> (the knob its rates set, rates)
    comparison.record = {
        "command": "goat " + " ".join(sys.argv[1:]) if ns.command_line is None else ns.command_line,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
        "rows": [e.label for e in entries],
        "seeds": seeds,
        "lr_grid": {label: rates for label, (_, rates) in grids.items()},
        "rate_knob": {label: knob for label, (knob, _) in grids.items()},  # lr, or lr_from_lora (a LoRA rate)
        "data": base.data,
        "model": base.model,
        "quantize": base.quantize,
        "given": given_knobs(ns),
    }
    # the first row's settings, the data and --output are checked before any model or peft loads
    preflight(resolve_run(Comparison.row(entries[0], base)), output, ns.overwrite)
    from .engine import compare

    summary = compare(comparison, base, output, overwrite=ns.overwrite, resume=ns.resume)
    with open(os.path.join(output, "report.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    saved = report["settings"]
    print(
        markdown_table(
            summary,
            saved["metric"],
            saved["lower_is_better"],
            saved["reference"],
            (report["constant_baseline"] or {}).get(saved["metric"]),
            saved["baseline_name"],
            saved.get("quantize"),
        )
    )
    print(f"report: {os.path.join(os.path.abspath(output), 'report.md')}")
    _LIBRARY_OUTPUT.keep_in(output)
    return 0


def cmd_inspect(ns: argparse.Namespace) -> int:
    """Show which layers GOAT would adapt in a model (shapes, scale s, parameters), or summarise a
    run folder given as --run."""
    if ns.run:
        path = os.path.join(ns.run, "metrics.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{ns.run!r} is not a run folder: {path!r} is missing")
        with open(path, encoding="utf-8") as fh:
            metrics = json.load(fh)
        keys = [
            "task",
            "method",
            "metric",
            *sorted(k for k in metrics if k.startswith(("test_", "validation_"))),
            "trainable_params",
            "trainable_percent",
            "wall_time_s",
            "step_time_s",
            "peak_memory_mb",
            "router",
        ]
        for key in keys:
            if key in metrics:
                print(f"{key:>26}: {metrics[key]}")
        return 0
    from . import functional as F
    from . import hf
    from .inject import find_target_modules
    from .layer import layer_shape
    from .engine import resolve_run
    from .methods import goat_config_for

    settings = resolve_run(flags=given_knobs(ns)).settings
    if settings.model and hf.is_efficientnet_lite0(settings.model):
        model, head = hf.load_image_classifier(settings.model, 10), ["classifier"]
        targets = hf.image_target_modules(model)
    else:  # whichever head the checkpoint takes: a text classifier, an image classifier, a decoder
        loaders = (
            lambda: hf.load_sequence_classifier(settings.model, 2),
            lambda: hf.load_image_classifier(settings.model, 2),
            lambda: hf.load_causal_lm(settings.model or hf.MINILM),
        )
        model, errors = None, []
        for load in loaders:
            try:
                model = load()
                break
            except Exception as err:  # noqa: BLE001 - each Auto class refuses the others' configs its own way
                errors.append(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        if model is None:
            raise ValueError(f"model {settings.model!r} could not be loaded: {errors[0]}")
        head = hf.default_modules_to_save(model)
        targets = None
    config = goat_config_for("goat", settings, targets or "all-linear", head)
    names = find_target_modules(model, config)
    added = 0
    print(f"{'layer':<60} {'out x in':>12} {'s':>8}")
    for name in names:
        m, n = layer_shape(model.get_submodule(name))
        s = F.scaling_factor(config.scaling, n, config.expert_rank, config.eta, config.lora_alpha)
        added += config.r * (m + n) + config.num_experts * n
        print(f"{name:<60} {f'{m} x {n}':>12} {s:>8.2f}")
    total = sum(p.numel() for p in model.parameters())
    print(
        f"{len(names)} layers; GOAT adds {added:,d} trainable parameters ({100 * added / total:.2f}% of {total:,d})"
        f" plus the head {head}"
    )
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    """Speed and memory of the GOAT layer against the per-expert loop and LoRA (goat_lora.bench)."""
    run_bench = getattr(ns, "_run_bench", None)
    if run_bench is None:
        print("goat bench is not available (goat_lora.bench could not be imported)", file=sys.stderr)
        return 1
    return int(run_bench(ns) or 0)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; goat_lora.bench is imported only when the command is `bench` (it is heavier)."""
    from .methods import METHODS

    parser = _Parser(prog="goat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the goat-lora version")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose",
        action="store_true",
        help="print what the libraries log as it comes (kept in the folder's library.log otherwise)",
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    add_parser = functools.partial(sub.add_parser, parents=[common])

    p = add_parser("train", help="fine-tune with GOAT or a baseline", description=cmd_train.__doc__)
    add_knob_arguments(p, "train")
    p.add_argument("--output", default=None, help="run folder (default runs/<timestamp>-<method>)")
    p.add_argument(
        "--config",
        default=None,
        help="a run's config.json (or a JSON object of settings) to start from; "
        "flags given beside it override its values",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help='print the resolved settings (what config.json\'s "args" would hold) and exit',
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue a killed run (its --output) from its last checkpoint (other flags ignored)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_train)

    p = add_parser("eval", help="evaluate a saved run", description=cmd_eval.__doc__)
    p.add_argument("--adapter", required=True, help="a run folder written by goat train")
    add_knob_arguments(p, "eval")
    p.add_argument("--output", default=None, help="where to write metrics (default RUN/eval-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_eval)

    p = add_parser("compare", help="compare methods over seeds and a lr grid", description=cmd_compare.__doc__)
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"methods to compare (default all: {' '.join(METHODS)}; none when --vary is given)",
    )
    p.add_argument(
        "--vary",
        default=None,
        metavar="FIELD=V1,V2",
        help="GOAT variants under the same protocol, one per value, e.g. init=goat,principal,minor,random,"
        "zero; scaling=goat,alpha; top_k=1,2,4; aux_loss_coef=0,1e-4,1e-3,1e-2; routing=top_k,top_p,shared",
    )
    p.add_argument(
        "--budget",
        default="params",
        choices=("params", "rank"),
        help="params (default): each method's rank chosen so its trainable parameters are within 10%% of "
        "GOAT's at --rank (full and head exempt); rank: every method at --rank",
    )
    p.add_argument("--seeds", type=_at_least_one, default=3, help="number of seeds (default 3, starting at --seed)")
    p.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=None,
        help="one learning-rate grid for every method (default: a 2-value grid per method)",
    )
    p.add_argument(
        "--lr-grid",
        nargs="+",
        default=None,
        metavar="METHOD=LR,LR",
        help="per-method (or per-row) grids, e.g. goat=1e-3,3e-3 full=1e-4 (others keep their default grid)",
    )
    p.add_argument("--output", default=None, help="report folder (default runs/<timestamp>-compare)")
    p.add_argument("--config", default=None, help="a run's config.json (or a JSON object of settings) to start from")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted comparison (same command and --output): finished runs are reused",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    add_knob_arguments(p, "compare")
    p.set_defaults(func=cmd_compare)

    p = add_parser("bench", help="benchmark the GOAT layer", description=cmd_bench.__doc__)
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

    p = add_parser("inspect", help="show the layers GOAT adapts", description=cmd_inspect.__doc__)
    add_knob_arguments(p, "inspect")
    p.add_argument("--run", default=None, help="a run folder: print its metrics summary instead")
    p.set_defaults(func=cmd_inspect)
    return parser


def _offline_by_default(ns: argparse.Namespace) -> None:
    """Shipped models and built-in data need no hub: stay offline (fast, no network timeouts)
    unless the user set HF_HUB_OFFLINE, or names something that is neither shipped nor local."""
    from .hf import is_shipped
    from .tasks import BUILTIN_DATA

    if "HF_HUB_OFFLINE" in os.environ:
        return
    model = getattr(ns, "model", None)
    data = getattr(ns, "data", None)
    model_local = is_shipped(model) or os.path.exists(model)
    data_local = data is None or data in BUILTIN_DATA or os.path.exists(data) or "." in os.path.basename(data)
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
    _LIBRARY_OUTPUT.install(verbose=getattr(ns, "verbose", False))
    import signal

    def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so staging folders are removed
        raise KeyboardInterrupt

    if hasattr(signal, "SIGTERM"):
        try:
            signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread
            pass
    try:
        status = ns.func(ns)
        _LIBRARY_OUTPUT.mention_the_rest()
        return status
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
