"""Every knob of a run, declared once.

`RunSettings` is the single declaration: each field carries its default, its help text and the
commands it belongs to. The command line (`cli.py`) is built from these fields, `config.json`
records them under the same names (`lr`, `r`, `lora_alpha`, `epochs`, ...), `goat train --config`
reads them back, and `--print-config` prints them. Nothing here imports torch.

The adapter's knobs (`r`, `num_experts`, `top_k`, `routing`, `dropout`, `lora_alpha`, `scaling`, ...) are
GoatConfig's fields under GoatConfig's names and defaults: a GOAT run's adapter config is built from
them by name (methods.goat_config_for), and GoatConfig.validate is the one home of their rules. The
command line spells two of them differently (`--rank` for r, `--experts` for num_experts: FLAG_ALIASES).

A default of None means "chosen later": by the task family (epochs, batch size, model, data, ...),
by the method (learning rate, GOAT init and scaling) or by a recipe. `engine.resolve` fills them in,
in the one order below; config.json records the resolved values.

Precedence, lowest first: the field's default < the task's defaults < the method's preset <
`--config FILE` < `--recipe NAME` < flags given on the command line.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from .config import GoatConfig, InitMode, QuantizeKind, RoutingMode, ScalingMode
from .recipes import RECIPES

TRAIN, COMPARE, EVAL, INSPECT = "train", "compare", "eval", "inspect"
RUN = (TRAIN, COMPARE)  # knobs of a training run: goat train and goat compare
ANSWER_TYPES = ("number", "choice", "text")
SCALINGS = tuple(m.value for m in ScalingMode)
ROUTINGS = tuple(m.value for m in RoutingMode)
RECIPE_NAMES = tuple(RECIPES)
INITS = tuple(m.value for m in InitMode)
QUANTIZE_KINDS = tuple(m.value for m in QuantizeKind)
# transformers' SchedulerType names that need no extra arguments
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune")
# With CUDA graphs batches are padded to a multiple of this many tokens: a few shapes, so a few graphs
CUDA_GRAPH_PAD_MULTIPLE = 64


def compile_mode(mode: str, cuda: bool) -> str | None:
    """torch.compile's mode for --compile-mode: "auto" is reduce-overhead on CUDA, where a step of
    small kernels is bound by their launches and CUDA graphs replay the whole step in one launch
    (measured on an H200: GOAT 10.4 ms with CUDA graphs, 23.8 ms compiled without, 54.1 ms eager),
    and the default mode elsewhere (CPU: there are no CUDA graphs). None: torch's default."""
    if mode == "auto":
        return "reduce-overhead" if cuda else None
    return None if mode == "default" else mode


REPORTERS_HELP = "tensorboard (event files in RUN/tensorboard), wandb, both comma-separated, or none"


def knob(
    default: Any,
    help: str,
    *,
    commands: tuple[str, ...] = RUN,
    choices: tuple | None = None,
    minimum: float | None = None,
    exclusive_minimum: bool = False,
    metavar: str | None = None,
    adapter: bool = False,
) -> Any:
    """A RunSettings field: its default and everything the command line and validation need."""
    metadata = {
        "help": help,
        "commands": commands,
        "choices": choices,
        "minimum": minimum,
        "exclusive_minimum": exclusive_minimum,
        "metavar": metavar,
        "adapter": adapter,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_GOAT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GoatConfig)}
_NO_DEFAULT = object()


def adapter_knob(name: str, help: str, *, default: Any = _NO_DEFAULT, **command_line) -> Any:
    """A RunSettings field that is GoatConfig's field `name`: same name, GoatConfig's default (or None
    where the method chooses it), GoatConfig.validate's rules (so no minimum here)."""
    if name not in _GOAT_DEFAULTS:
        raise AssertionError(f"GoatConfig has no field {name!r}")
    return knob(_GOAT_DEFAULTS[name] if default is _NO_DEFAULT else default, help, adapter=True, **command_line)


@dataclass
class RunSettings:
    """The settings of one run (`goat train`), of each run of a comparison, and of `goat eval`."""

    # ---- the task: which family, which data -------------------------------------------------------
    task: str = knob("classification", "task family: classification, regression, image-classification, qa, causal-lm")
    data: str | None = knob(
        None,
        "a built-in data set (finefoods, ucla-courses, ucla-subjects, trump-tweets, fashion-mnist, tate, "
        "quiz-capitals, quiz-elements, instructions), a .csv/.tsv/.jsonl/.json/.parquet file, an image folder "
        "DIR/<class>/<file>, or a datasets hub name (needs network); default: the task's built-in one",
        commands=(TRAIN, COMPARE, EVAL),
    )
    data_config: str | None = knob(
        None, "configuration of a hub data set, e.g. --data glue --data-config mrpc", commands=(TRAIN, COMPARE, EVAL)
    )
    train_split: str = knob("train", "hub data set: the split to train on")
    test_split: str | None = knob(
        None,
        "hub data set: the split to test on (default test; when it has no labels, as in GLUE, the validation "
        "split is used instead and the summary says so)",
        commands=(TRAIN, COMPARE, EVAL),
    )
    test_data: str | None = knob(None, "a test file or image folder; otherwise a seeded 20% split of --data")
    text_column: str | None = knob(
        None, "column of the text (qa: of the prompt); default text (qa: question)", commands=(TRAIN, COMPARE, EVAL)
    )
    text_pair_column: str | None = knob(
        None,
        "column of the second text of a pair: both reach the tokenizer as a pair (separator and segment ids)",
        commands=(TRAIN, COMPARE, EVAL),
    )
    label_column: str | None = knob(
        None,
        "column of the label (regression: a number; qa: the answer); default label (qa: answer)",
        commands=(TRAIN, COMPARE, EVAL),
    )
    image_column: str | None = knob(
        None,
        "image-classification from a table: column of the image file paths (relative to the table); default image",
        commands=(TRAIN, COMPARE, EVAL),
    )
    target_column: str | None = knob(
        None,
        "qa: column of the text to train on (e.g. a worked solution); default the --label-column",
        commands=(TRAIN, COMPARE, EVAL),
    )
    answer_type: str | None = knob(
        None,
        "qa: how the answer is read from a generation and from the gold answer: number (after ####, else the "
        "last number), choice (the first option word: answer2, option1, B, true) or text (normalised); default "
        "text",
        choices=ANSWER_TYPES,
        commands=(TRAIN, COMPARE, EVAL),
    )
    prompt_template: str | None = knob(
        None,
        "qa: how a prompt is shown to the model: alpaca, instruction (default), plain, or a text holding {prompt}",
        commands=(TRAIN, COMPARE, EVAL),
    )
    max_new_tokens: int | None = knob(
        None, "qa: tokens generated per answer (default 32)", minimum=1, commands=(TRAIN, COMPARE, EVAL)
    )
    mask_prompt: bool = knob(False, "causal-lm: no loss on the prompt of rows with a response field")
    metric: str | None = knob(
        None,
        "the metric that picks the best epoch and learning rate, printed first "
        "(default: the task's first, e.g. accuracy, pearson, exact_match)",
    )
    train_size: int | None = knob(None, "training examples (default: the task's; 0 or a user file: all)", minimum=0)
    test_size: int | None = knob(None, "test examples (default all; 1000 Fashion-MNIST)", minimum=0)
    image_size: int = knob(
        64, "EfficientNet-Lite0 input size in pixels (transformers models use their processor's)", minimum=1
    )

    # ---- the model and the method -------------------------------------------------------------------
    recipe: str | None = knob(
        None,
        "fill in the hyper-parameters of one of the paper's runs (goat_lora/recipes.py): "
        + ", ".join(RECIPE_NAMES)
        + "; flags given beside it win",
        choices=RECIPE_NAMES,
    )
    method: str = knob(
        "goat",
        "goat, goat_mini, goat_s, molora, hydralora, mixlora, lora, rslora, dora, pissa, milora, "
        "kasa, lora_ga, full, head",
        commands=(TRAIN,),
    )
    model: str | None = knob(
        None,
        "local path or hub name; default the task's shipped model (minilm; smollm2 for "
        "qa / causal-lm; EfficientNet-Lite0 for images)",
        commands=(TRAIN, COMPARE, INSPECT),
    )
    target_modules: list[str] | None = knob(
        None,
        "layers to adapt: names, name suffixes (query value) or one regex (default every Linear but the head; "
        "EfficientNet: its 1x1 convolutions)",
        metavar="NAME",
    )
    lora_ga_batches: int = knob(
        8,
        "--method lora_ga: training batches (of --batch-size, drawn with --seed) its "
        "gradient estimate averages over before training; its cost is reported apart "
        "(metrics.json lora_ga_init)",
        minimum=1,
    )
    # The adapter's knobs carry GoatConfig's names and defaults (declared there); `--rank` and `--experts`
    # are the command line's spellings of r and num_experts (FLAG_ALIASES). Their rules are GoatConfig's.
    r: int = adapter_knob("r", "total LoRA rank r (GOAT: over all experts)", commands=(TRAIN, COMPARE, INSPECT))
    num_experts: int = adapter_knob("num_experts", "number of experts E", commands=(TRAIN, COMPARE, INSPECT))
    top_k: int = adapter_knob("top_k", "experts per token k", commands=(TRAIN, COMPARE, INSPECT))
    routing: str = adapter_knob(
        "routing",
        "how GOAT's tokens pick experts: top_k (the paper's default), top_p (the fewest most probable "
        "experts reaching --top-p), shared (expert 0 always on beside the top-k of the others); the residual follows "
        "the mode",
        choices=ROUTINGS,
    )
    top_p: float = adapter_knob(
        "top_p", "--routing top_p: the probability mass a token's experts must reach, in (0, 1]"
    )
    dropout: float = adapter_knob("dropout", "the adapters' dropout, in [0, 1)")
    lora_alpha: float | None = adapter_knob(
        "lora_alpha",
        "LoRA alpha (LoRA family: scale alpha / r; GOAT: with --scaling alpha or rslora); default 2 x "
        "rank, the paper's pairs 8 / 16 and 32 / 64",
        default=None,
    )
    scaling: str | None = adapter_knob(
        "scaling",
        "GOAT's scale s: goat = sqrt(3 eta n / d) (paper, Theorem 3.5), alpha = lora_alpha / d (what the "
        "public scripts ran), rslora = lora_alpha / sqrt(d); default: the method's (goat; molora: alpha)",
        default=None,
        choices=SCALINGS,
    )
    init: str | None = adapter_knob(
        "init",
        "which singular components GOAT's experts start from: goat (segment heads), goat_mini (segment "
        "tails), principal, minor, random, zero (MoLoRA); default: the method's",
        default=None,
        choices=INITS,
    )
    eta: float = adapter_knob("eta", "eta in s = sqrt(3 eta n / d): full fine-tuning's learning rate over LoRA's")
    rho: float = adapter_knob("rho", "prior shrink rho: s B_j A_j = U_j S_j V_j^T / rho")
    init_cof: float | None = adapter_knob(
        "init_cof",
        "residual coefficient c in W_res = c s sum_j B_j A_j (default 1/E, which keeps the start at the "
        "pretrained model)",
    )
    aux_loss_coef: float = adapter_knob("aux_loss_coef", "load-balancing loss coefficient")
    quantize: str | None = adapter_knob(
        "quantize",
        "quantize the frozen base with bitsandbytes (pip install goat-lora[quant]): nf4 or fp4 (4-bit, double "
        "quantization: QLoRA's recipe) or int8; GOAT computes its experts from W0 in float32, then quantizes "
        "W0 - W_res (QPiSSA's order); lora, rslora, dora, pissa run as QLoRA, QrsLoRA, QDoRA, QPiSSA; adapters, "
        "routers and the head stay float32",
        choices=QUANTIZE_KINDS,
    )

    # ---- the schedule ------------------------------------------------------------------------------
    lr: float | None = knob(
        None,
        "learning rate (default: per method; GOAT's from --lr-from-lora)",
        minimum=0.0,
        exclusive_minimum=True,
    )
    lr_from_lora: float | None = knob(
        None,
        "GOAT methods: the learning rate derived from a LoRA rate that works on the same layers (a LoRA of rank "
        "--rank, alpha --lora-alpha): the rate at which AdamW's first step moves each layer as far as that "
        "LoRA's (geometric mean over the layers), divided by 3 for GOAT's larger second-order move "
        "(goat_lora.rate_rule). Default for goat, goat_mini and goat_s when --lr is not given: 1e-3, LoRA's "
        "default rate",
        minimum=0.0,
        exclusive_minimum=True,
    )
    epochs: float | None = knob(
        None,
        "epochs (default: the task's; for text classification and regression, from the data's size: enough "
        "for 400 optimizer steps, at most 20, the best epoch kept)",
        minimum=0.0,
        exclusive_minimum=True,
    )
    batch_size: int | None = knob(None, "training batch size per process (default: the task's, 16 for text)", minimum=1)
    eval_batch_size: int = knob(64, "evaluation batch size", minimum=1, commands=(TRAIN, COMPARE, EVAL))
    max_length: int | None = knob(None, "max tokens per example (default: the task's, 96 for text)", minimum=1)
    gradient_accumulation_steps: int = knob(
        1, "batches per optimisation step (effective batch = batch size x this x processes)", minimum=1
    )
    lr_scheduler: str = knob(
        "linear", "learning-rate schedule after the warm-up: linear, cosine, constant, ...", choices=LR_SCHEDULERS
    )
    warmup_ratio: float = knob(0.06, "fraction of the steps with a linear learning-rate warm-up", minimum=0.0)
    weight_decay: float = knob(0.0, "AdamW weight decay", minimum=0.0)
    max_grad_norm: float = knob(1.0, "gradient clipping norm (0: none)", minimum=0.0)
    seed: int = adapter_knob("seed", "seed for splits, initialisation and data order")
    logging_steps: int = knob(10, "log the training loss every N steps", minimum=1)
    eval_each_epoch: bool = knob(True, "the validation metric after every epoch")
    select: str = knob(
        "best-epoch",
        "which epoch's model is tested and saved: best-epoch (the best validation "
        "--metric, the paper's protocol) or last",
        choices=("best-epoch", "last"),
    )
    save_steps: int = knob(
        500,
        "checkpoint every N steps in the hidden staging folder, for --resume (0: none)",
        minimum=0,
        commands=(TRAIN,),
    )

    # ---- goat eval with lm-evaluation-harness (goat_lora.harness) ----------------------------------
    harness: list[str] | None = knob(
        None,
        "score the run's model with lm-evaluation-harness tasks (their names, or tasks of --harness-include) "
        "instead of its own test split; decoders only; needs pip install 'goat-lora[eval]'",
        commands=(EVAL,),
        metavar="TASK",
    )
    harness_include: str | None = knob(
        None, "a folder of lm-eval task YAML files (e.g. examples/harness)", commands=(EVAL,), metavar="DIR"
    )
    harness_limit: int | None = knob(
        None, "at most this many examples per harness task (default all)", minimum=1, commands=(EVAL,)
    )

    # ---- scale-out and reporting (goat_lora.scaleout, docs/scaling.md) ------------------------------
    shuffle: bool = knob(
        True,
        "shuffle the training data (--no-shuffle: sequential, so N processes see the 1-process run's global batches)",
    )
    gradient_checkpointing: bool = knob(False, "activation checkpointing (use_reentrant=False)")
    bf16: bool = knob(False, "bfloat16 autocast (CPU or GPU); weights, adapters and optimiser state stay float32")
    report_to: str = knob("tensorboard", REPORTERS_HELP)
    deepspeed: str | None = knob(None, "DeepSpeed config (GPU), e.g. configs/ds_zero2.json", metavar="CONFIG")
    compile: bool = knob(
        False,
        "torch.compile the whole model for training (GOAT's routing fused with the rest); the "
        "first steps pay the compilation, and a new batch shape one recompilation",
    )
    compile_backend: str = knob(
        "inductor",
        "--compile: the torch.compile backend; inductor generates fused kernels, "
        "aot_eager and eager run the captured graph with eager kernels (a quick check that a "
        "model compiles)",
        choices=COMPILE_BACKENDS,
    )
    compile_mode: str = knob(
        "auto",
        "--compile: torch.compile's mode; auto is reduce-overhead (the step captured in "
        "CUDA graphs) on CUDA and default elsewhere",
        choices=COMPILE_MODES,
    )
    pad_to_multiple: int | None = knob(
        None,
        "pad each batch to a multiple of N tokens (at most --max-length), so that "
        "batches come in a few shapes; default 64 when --compile records CUDA graphs "
        "(each new shape is a new graph), none otherwise",
        metavar="N",
        minimum=1,
    )

    # ---- conversions --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str) -> "RunSettings":
        """Settings from a saved dict (config.json's "args", goat_resume.json, a --config file),
        refusing unknown names and values of the wrong type with one line naming `source`."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: the settings must be a JSON object, got {type(values).__name__}")
        values = upgrade_legacy(values)
        fields = knob_fields()
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {unknown}; known: {sorted(fields)}")
        for name, value in values.items():
            if not value_fits(fields[name], value):
                raise ValueError(f"{source}: setting {name}={value!r} must be {type_text(fields[name])}")
        return cls(**values)

    def replace(self, **changes) -> "RunSettings":
        return dataclasses.replace(self, **changes)

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self) -> "RunSettings":
        """One-line ValueErrors naming the flag, the value and what is allowed; returns self. The adapter's
        knobs are checked by GoatConfig.validate when the run is resolved (methods.check_adapter)."""
        for name, spec in knob_fields().items():
            value = getattr(self, name)
            if value is None:
                continue
            meta = spec.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise ValueError(f"{flag(name)} {value!r} is not allowed; choose one of {', '.join(meta['choices'])}")
            minimum = meta["minimum"]
            if minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value) or value < minimum or (meta["exclusive_minimum"] and value == minimum):
                    relation = ">" if meta["exclusive_minimum"] else ">="
                    raise ValueError(f"{flag(name)} {value} must be {relation} {minimum:g}")
        if self.warmup_ratio >= 1.0:
            raise ValueError(f"--warmup-ratio {self.warmup_ratio} must be in [0, 1)")
        return self


# ---- field introspection (the command line and from_dict use it) ------------------------------------
def knob_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(RunSettings)}


def adapter_knobs() -> tuple[str, ...]:
    """The RunSettings fields that are GoatConfig fields of the same name."""
    return tuple(name for name, spec in knob_fields().items() if spec.metadata["adapter"])


# The command line's spellings of two adapter knobs (the flags users know; config.json says r, num_experts)
FLAG_ALIASES = {"r": "rank", "num_experts": "experts"}
# Settings written before the adapter knobs took GoatConfig's names (config.json "args" before 2026-12-06)
LEGACY_NAMES = {alias: name for name, alias in FLAG_ALIASES.items()}


def flag(name: str) -> str:
    """The command-line flag of a field: top_k -> --top-k, r -> --rank."""
    return "--" + FLAG_ALIASES.get(name, name).replace("_", "-")


def knob_name(text: str) -> str | None:
    """The field a name written by a user stands for (top-k, top_k, rank, r -> top_k, top_k, r, r); None if none."""
    name = text.strip().lstrip("-").replace("-", "_")
    name = LEGACY_NAMES.get(name, name)
    return name if name in knob_fields() else None


def in_flag_terms(message: str) -> str:
    """A GoatConfig error in the command line's words: "GoatConfig.r=6 must be divisible by num_experts=4"
    -> "--rank 6 must be divisible by --experts 4"."""
    message = message.replace("GoatConfig.", "")
    for name in sorted(adapter_knobs(), key=len, reverse=True):
        message = re.sub(rf"(?<![\w.-]){name}=", flag(name) + " ", message)
    return message


_HINTS: dict[str, Any] = {}


def field_type(spec: dataclasses.Field) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a field: int | None -> (int, True); list[str] -> (list, False)."""
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(RunSettings))
    hint = _HINTS[spec.name]
    args = (
        [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, _union_type())
        else [hint]
    )
    optional = hint is not args[0]
    base = args[0]
    return (list if typing.get_origin(base) is list else base), optional


def _union_type():
    import types

    return types.UnionType


def type_text(spec: dataclasses.Field) -> str:
    base, optional = field_type(spec)
    text = (
        "a list of strings"
        if base is list
        else {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[base]
    )
    return text + (" or null" if optional else "")


def value_fits(spec: dataclasses.Field, value: Any) -> bool:
    base, optional = field_type(spec)
    if value is None:
        return optional
    if base is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if base is float:
        return isinstance(value, (int, float))
    if base is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, base)


# ---- settings saved by older versions ----------------------------------------------------------------
def upgrade_legacy(values: dict) -> dict:
    """Settings written by older versions (config.json "args", --config files) in today's names: the
    adapter knobs were `rank` and `experts` (now GoatConfig's r and num_experts); in goat-lora 0.1.0 an
    image run was task "classification" on fashion-mnist, now the image-classification family."""
    values = {
        LEGACY_NAMES.get(name, name): value for name, value in values.items()
    }  # rank -> r, experts -> num_experts
    if values.get("task") == "classification" and str(values.get("data")).lower().replace("_", "-") in (
        "fashion-mnist",
        "fashionmnist",
    ):
        values["task"] = "image-classification"
    return values
