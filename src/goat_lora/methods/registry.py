"""The methods `goat train --method` and `goat compare` know: their names, learning-rate defaults and
grids, which run on a quantized base, and how each is prepared. The engine imports this package's
registry and load modules only; the methods themselves live beside them:

  goat, goat_mini, goat_s, molora   this project's GoatModel (GoatConfig differs: init / scaling)
  hydralora                         methods.hydralora (shared A, one B per expert, dense softmax router)
  lora, rslora, dora, pissa, milora methods.peft_methods (peft's LoRA with its options; MiLoRA's init and
                                    PiSSA's on 1x1 convolutions written there, through svd.py)
  kasa, lora_ga                     methods.peft_variants (peft's KasaConfig; LoraGAConfig + preprocess_loraga
                                    on a few of the run's training batches, `batches` below)
  mixlora                           methods.mixlora (routed LoRA experts per FFN block, peft's LoRA on attention)
  full, head                        every parameter / only the classification head trained

Every method adapts the same layers (`targets`: all Linear layers of a transformer except the head,
or the 1x1 convolutions of the image model) and trains the head in full. With `--quantize nf4 | fp4 |
int8` (goat_lora.quant) the adapted layers' frozen weights are quantized by bitsandbytes, one
quantizer for every method: GOAT quantizes W0 - W_res after its SVD (QPiSSA's order); lora, rslora and
dora run on the quantized W0 through peft's bitsandbytes layers (QLoRA, QrsLoRA, QDoRA); pissa takes
peft's documented QPiSSA route. `QUANTIZABLE` says which methods can; the others are refused by name.
"""

from __future__ import annotations

from torch import nn

from .. import quant
from ..config import GoatConfig
from ..model import count_parameters, get_goat_model  # noqa: F401  (count_parameters: for every method)
from ..settings import adapter_knobs
from .hydralora import get_hydralora_model
from .mixlora import get_mixlora_model
from .peft_methods import get_peft_baseline
from .peft_variants import get_kasa_model, get_loraga_model

GOAT_METHODS = ("goat", "goat_mini", "goat_s", "molora")
PEFT_METHODS = ("lora", "rslora", "dora", "pissa", "milora")
PEFT_VARIANTS = ("kasa", "lora_ga")  # peft's own configs, in peft >= 0.21 (peft_variants.PEFT_SUPPORT)
METHODS = GOAT_METHODS + ("hydralora", "mixlora") + PEFT_METHODS + PEFT_VARIANTS + ("full", "head")

# Learning rate when --lr is not given. GOAT's own methods have none: their rate comes from LoRA's
# through the rate rule (goat_lora.rate_rule), so that their first AdamW steps move each layer as far as
# a LoRA's at its rate (docs/results/scaling-study/). MoLoRA starts like LoRA (B = 0) and keeps LoRA's.
RATE_RULE_METHODS = ("goat", "goat_mini", "goat_s")
DEFAULT_LR = {
    "molora": 1e-3,
    "hydralora": 1e-3,
    "lora": 1e-3,
    "rslora": 1e-3,
    "dora": 1e-3,
    "pissa": 5e-4,
    "milora": 1e-3,
    "full": 5e-5,
    "head": 3e-2,
    "kasa": 1e-3,
    "lora_ga": 1e-3,
    "mixlora": 1e-3,
}
DEFAULT_LR_FROM_LORA = DEFAULT_LR["lora"]

# What a GOAT-family method changes in GoatConfig when the flag is not given (--init, --scaling).
GOAT_PRESETS = {
    "goat": {"init": "goat", "scaling": "goat"},
    "goat_mini": {"init": "goat_mini", "scaling": "goat"},  # the public code's segment tails
    "goat_s": {"init": "goat", "scaling": "goat"},  # + per-expert scales (goat_config_for)
    "molora": {"init": "zero", "scaling": "alpha"},  # plain LoRA-MoE: zero-init B, no residual, s = alpha / d
}

# Learning-rate grids for `goat compare` (picked on validation). GOAT's own methods run on LoRA's grid
# read as LoRA rates, each converted by the rate rule (--lr-from-lora); a --lr-grid given for them is
# taken as their own rates.
DEFAULT_LR_GRID = {
    "goat": (1e-3, 3e-3),
    "goat_mini": (1e-3, 3e-3),
    "goat_s": (1e-3, 3e-3),
    "molora": (1e-3, 3e-3),
    "hydralora": (1e-3, 3e-3),
    "lora": (1e-3, 3e-3),
    "rslora": (1e-3, 3e-3),
    "dora": (1e-3, 3e-3),
    "pissa": (3e-4, 1e-3),
    "milora": (1e-3, 3e-3),
    # LoRA's grid for the LoRA variants and MoLoRA's for MixLoRA, until a comparison says otherwise
    # (docs/results/new-baselines/)
    "kasa": (1e-3, 3e-3),
    "lora_ga": (1e-3, 3e-3),
    "mixlora": (1e-3, 3e-3),
    "full": (1e-4, 3e-4),
    "head": (3e-2, 1e-1),  # a linear head on frozen features: at 3e-3 / 1e-2 it kept the majority class
}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


# Methods that run on a quantized base (--quantize), and why the others do not.
QUANTIZABLE = GOAT_METHODS + ("lora", "rslora", "dora", "pissa")
NOT_QUANTIZABLE = {
    "milora": "its minor-component init rewrites the full-precision weight and has no quantized route here",
    "hydralora": "its layer has no quantized-base route here",
    "mixlora": "its expert layers have no quantized-base route here",
    "kasa": "peft's KaSA truncates the full-precision weight by an SVD and has no quantized route",
    "lora_ga": "peft's LoRA-GA needs full-precision gradients of the base weights",
    "full": "a quantized weight cannot be trained",
    "head": "it adapts no layer, so there is no adapter to train on the quantized base",
}


def check_quantize(methods: str | list[str], kind: str | None) -> None:
    """Refuse, in one line, --quantize for methods without a quantized route (naming each, and why), or
    without bitsandbytes."""
    if kind is None:
        return
    refused = [m for m in ([methods] if isinstance(methods, str) else methods) if m not in QUANTIZABLE]
    if refused:
        why = "; ".join(f"{m!r}: {NOT_QUANTIZABLE[m]}" for m in refused)
        raise ValueError(
            f"--quantize {kind}: {'method' if len(refused) == 1 else 'methods'} {why}; methods that run "
            f"on a quantized base: {', '.join(QUANTIZABLE)}"
        )
    try:
        quant.bitsandbytes()
    except ImportError:
        raise ValueError(f"--quantize {kind} needs bitsandbytes: {quant.INSTALL_HINT}") from None


def method_defaults(settings) -> dict:
    """The method's values for knobs left at None: learning rate (for GOAT's own methods, the LoRA rate the
    rate rule converts, unless --lr is given); LoRA alpha = 2 x rank (the paper's
    rank / alpha pairs, 8 / 16 and 32 / 64); GOAT's init and scaling. Knobs a method does not use
    stay None (recorded as null in config.json)."""
    if settings.method in RATE_RULE_METHODS:  # the rate follows from LoRA's, once the model is built
        defaults = {} if settings.lr is not None else {"lr_from_lora": DEFAULT_LR_FROM_LORA}
    else:
        defaults = {"lr": DEFAULT_LR[settings.method]}
    if settings.method not in ("full", "head"):
        defaults["lora_alpha"] = 2.0 * settings.r
    return {**defaults, **GOAT_PRESETS.get(settings.method, {})}


def goat_config_for(method: str, settings, targets: list[str], head: list[str]) -> GoatConfig:
    """The GoatConfig of a GOAT-family method: the run's adapter knobs by name (they are GoatConfig's
    fields), the layers the task adapts and trains in full, and GOAT-s's per-expert scales."""
    knobs = {name: getattr(settings, name) for name in adapter_knobs()}
    return GoatConfig(
        **knobs,
        per_expert_scaling=method == "goat_s",
        target_modules=targets,
        modules_to_save=head or None,
        base_model_name_or_path=settings.model,
    )


def check_adapter(settings) -> None:
    """The adapter's rules, from their one home (GoatConfig.validate), for a resolved run: a GOAT method's
    config as it will be built; any other adapter as one expert of rank r (its r, dropout, alpha and
    quantization are checked; experts and routing are not its knobs). One-line ValueErrors."""
    method, experts, top_k = settings.method, settings.num_experts, settings.top_k
    if method in ("full", "head"):
        return
    if method == "mixlora" and not 1 <= top_k <= experts:  # its own experts and router per FFN block
        raise ValueError(f"--method mixlora: --top-k {top_k} must be between 1 and --experts {experts}")
    if method not in GOAT_METHODS:  # experts, routing, init and GOAT's scaling are not its knobs
        settings = settings.replace(num_experts=1, top_k=1, routing="top_k", init="zero", scaling="alpha")
    goat_config_for(settings.method, settings, ["*"], [])
    if method == "hydralora" and experts < 1:  # its own experts: one B each
        raise ValueError(f"GoatConfig.num_experts={experts} must be >= 1")


def prepare_model(
    method: str, model: nn.Module, settings, targets: list[str], head: list[str], batches: list[dict] | None = None
) -> nn.Module:
    """Adapt `model` for `method` (in place where possible) and return the model to train.
    `settings`: the run's resolved RunSettings (rank, experts, top_k, lora_alpha, dropout, seed, ...).
    `batches`: training batches for a method whose start depends on data (LoRA-GA); without them its
    structure only is built (parameter counts, or a reloaded run whose tensors come from its folder)."""
    check_method(method)
    check_quantize(method, settings.quantize)
    if method in GOAT_METHODS:
        return get_goat_model(model, goat_config_for(method, settings, targets, head))
    if method == "hydralora":
        return get_hydralora_model(model, settings, targets, head)
    if method in PEFT_METHODS:
        return get_peft_baseline(method, model, settings, targets, head)
    if method == "kasa":
        return get_kasa_model(model, settings, targets, head)
    if method == "lora_ga":
        return get_loraga_model(model, settings, targets, head, batches)
    if method == "mixlora":
        return get_mixlora_model(model, settings, targets, head)
    for param in model.parameters():
        param.requires_grad_(method == "full")
    for name in head:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    return model
