"""Methods compared in the paper: a name -> a model ready to train, with the same targets and budget knobs.

  goat, goat_mini, goat_s, molora   this project's GoatModel (GoatConfig differs: init / scaling)
  hydralora                         shared A, one B per expert, dense softmax router (HydraLoRA,
                                    Tian et al. 2024); a small module defined here
  lora, rslora, dora, pissa         peft's LoRA with its own options (not re-written); peft's PiSSA
                                    refuses convolutions, so on the image model's 1x1 convs pissa is
                                    initialised here by peft's formula (`svd_lora_init`)
  milora                            peft's LoRA, re-initialised from the minor singular components
                                    (MiLoRA, Wang et al. 2024; peft has no such init)
  full                              every parameter trained
  head                              only the classification head trained

Every method adapts the same layers (`target_modules`: all Linear layers of a transformer except the
head, or the 1x1 convolutions of the image model) and trains the head in full.

With `--quantize nf4 | fp4 | int8` (goat_lora.quant) the adapted layers' frozen weights are quantized by
bitsandbytes, one quantizer for every method: GOAT quantizes W0 - W_res after its SVD (QPiSSA's order);
lora, rslora and dora run on the quantized W0 through peft's bitsandbytes layers (QLoRA, QrsLoRA, QDoRA);
pissa takes peft's documented QPiSSA route (PiSSA's SVD on the full-precision W0, then the residual
W0 - s B A quantized). `QUANTIZABLE` says which methods can; the others are refused by name.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from . import quant
from .config import GoatConfig
from .inject import replace_module
from .model import count_parameters  # noqa: F401  (the registry's callers count every method's parameters)

GOAT_METHODS = ("goat", "goat_mini", "goat_s", "molora")
PEFT_METHODS = ("lora", "rslora", "dora", "pissa", "milora")
METHODS = GOAT_METHODS + ("hydralora",) + PEFT_METHODS + ("full", "head")

# Learning rate when --lr is not given. GOAT's s = sqrt(3 n / d) makes its update behave like a
# larger learning rate than LoRA's alpha / r, so its default is lower (tuned on Fine Foods).
DEFAULT_LR = {
    "goat": 3e-4, "goat_mini": 3e-4, "goat_s": 3e-4, "molora": 1e-3, "hydralora": 1e-3,
    "lora": 1e-3, "rslora": 1e-3, "dora": 1e-3, "pissa": 5e-4, "milora": 1e-3, "full": 5e-5, "head": 3e-2,
}  # fmt: skip

# What a GOAT-family method changes in GoatConfig when the flag is not given (--init, --scaling).
GOAT_PRESETS = {
    "goat": {"init": "goat", "scaling": "goat"},
    "goat_mini": {"init": "goat_mini", "scaling": "goat"},  # the public code's segment tails
    "goat_s": {"init": "goat", "scaling": "goat"},  # + per-expert scales (goat_config_for)
    "molora": {"init": "zero", "scaling": "alpha"},  # plain LoRA-MoE: zero-init B, no residual, s = alpha / d
}

# Learning-rate grids for `goat compare` (picked on validation). GOAT's theoretical scaling acts
# like a larger learning rate, so its grid sits lower than LoRA's; full fine-tuning lower still.
DEFAULT_LR_GRID = {
    "goat": (3e-4, 1e-3),
    "goat_mini": (3e-4, 1e-3),
    "goat_s": (3e-4, 1e-3),
    "molora": (1e-3, 3e-3),
    "hydralora": (1e-3, 3e-3),
    "lora": (1e-3, 3e-3),
    "rslora": (1e-3, 3e-3),
    "dora": (1e-3, 3e-3),
    "pissa": (3e-4, 1e-3),
    "milora": (1e-3, 3e-3),
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
        raise ValueError(f"--quantize {kind}: {'method' if len(refused) == 1 else 'methods'} {why}; methods that run "
                         f"on a quantized base: {', '.join(QUANTIZABLE)}")  # fmt: skip
    try:
        quant.bitsandbytes()
    except ImportError:
        raise ValueError(f"--quantize {kind} needs bitsandbytes: {quant.INSTALL_HINT}") from None


def method_defaults(settings) -> dict:
    """The method's values for knobs left at None: learning rate; LoRA alpha = 2 x rank (the paper's
    rank / alpha pairs, 8 / 16 and 32 / 64); GOAT's init and scaling. Knobs a method does not use
    stay None (recorded as null in config.json)."""
    defaults = {"lr": DEFAULT_LR[settings.method]}
    if settings.method not in ("full", "head"):
        defaults["lora_alpha"] = 2.0 * settings.rank
    return {**defaults, **GOAT_PRESETS.get(settings.method, {})}


def goat_config_for(method: str, settings, targets: list[str], head: list[str]) -> GoatConfig:
    """The GoatConfig of a GOAT-family method from the run's (resolved) settings."""
    return GoatConfig(
        r=settings.rank,
        num_experts=settings.experts,
        top_k=settings.top_k,
        routing=settings.routing,
        top_p=settings.top_p,
        init=settings.init,
        scaling=settings.scaling,
        lora_alpha=settings.lora_alpha,
        eta=settings.eta,
        rho=settings.rho,
        init_cof=settings.init_cof,
        per_expert_scaling=method == "goat_s",
        dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=head or None,
        aux_loss_coef=settings.aux_loss_coef,
        quantize=settings.quantize,
        seed=settings.seed,
        base_model_name_or_path=settings.model,
    )


def prepare_model(method: str, model: nn.Module, settings, targets: list[str], head: list[str]) -> nn.Module:
    """Adapt `model` for `method` (in place where possible) and return the model to train.
    `settings`: the run's resolved RunSettings (rank, experts, top_k, lora_alpha, dropout, seed, ...)."""
    check_method(method)
    check_quantize(method, settings.quantize)
    if method in GOAT_METHODS:
        from .model import get_goat_model

        return get_goat_model(model, goat_config_for(method, settings, targets, head))
    if method == "hydralora":
        return get_hydralora_model(model, settings, targets, head)
    if method in PEFT_METHODS:
        return get_peft_baseline(method, model, settings, targets, head)
    for param in model.parameters():
        param.requires_grad_(method == "full")
    for name in head:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    return model


# ---- peft baselines ---------------------------------------------------------------------------
def get_peft_baseline(method: str, model: nn.Module, settings, targets: list[str], head: list[str]):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=head or None,
        use_rslora=method == "rslora",
        use_dora=method == "dora",
        init_lora_weights="pissa" if method == "pissa" and not _has_convolutions(model, targets) else True,
    )
    spec = None if settings.quantize is None else quant.QuantSpec(settings.quantize)
    if spec is not None and method != "pissa":  # QLoRA: peft adapts the quantized layers (its bitsandbytes LoRA)
        quant.quantize_modules(model, targets, spec)
    torch.manual_seed(settings.seed)  # peft draws lora_A from the global generator
    peft_model = get_peft_model(model, config)
    if method == "milora":
        svd_lora_init(peft_model, "minor")
    elif method == "pissa" and config.init_lora_weights is True:
        svd_lora_init(peft_model, "principal")
    if spec is not None and method == "pissa":
        peft_model = quantized_pissa(peft_model, config, targets, spec)
    return peft_model


def quantized_pissa(peft_model, config, targets: list[str], spec: quant.QuantSpec):
    """QPiSSA by peft's documented route, in memory: PiSSA's factors come from the full-precision W
    (already done: the base holds the residual W - s B A), the residual base is quantized, and a LoRA
    of the same config on the quantized base receives the PiSSA factors (peft cannot run its PiSSA SVD
    on a quantized weight: it asks for exactly this)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    factors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    residual = peft_model.unload()  # no merge: the base layers hold W - s B A
    quant.quantize_modules(residual, targets, spec)
    quantized = get_peft_model(residual, dataclasses.replace(config, init_lora_weights=True))
    set_peft_model_state_dict(quantized, factors)
    return quantized


def _has_convolutions(model: nn.Module, targets: list[str]) -> bool:
    return any(isinstance(model.get_submodule(name), nn.Conv2d) for name in targets)


@torch.no_grad()
def svd_lora_init(peft_model, components: str) -> None:
    """Start each LoRA from r singular components of its weight W (m, n; a 1x1 conv as its matrix):
    the largest (PiSSA, peft's `pissa_init` formula) or the smallest (MiLoRA, which peft lacks):
    A = sqrt(S_r) V_r^T / sqrt(s), B = U_r sqrt(S_r) / sqrt(s), and W <- W - s B A, so the model
    starts exactly at the pretrained one."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A:
            base = module.get_base_layer()
            lora_A, lora_B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            scale = module.scaling[adapter]
            weight = base.weight.view(base.weight.shape[0], -1)  # (m, n); 1x1 convs too
            U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
            r = lora_A.shape[0]
            keep = slice(0, r) if components == "principal" else slice(-r, None)
            U_r, S_r, Vh_r = U[:, keep], S[keep], Vh[keep]
            A = (torch.diag(S_r.sqrt()) @ Vh_r) / math.sqrt(scale)  # (r, n)
            B = (U_r @ torch.diag(S_r.sqrt())) / math.sqrt(scale)  # (m, r)
            lora_A.copy_(A.view_as(lora_A).to(lora_A.dtype))
            lora_B.copy_(B.view_as(lora_B).to(lora_B.dtype))
            weight.copy_((weight.double() - scale * B @ A).to(weight.dtype))


# ---- HydraLoRA --------------------------------------------------------------------------------
class HydraLoraLayer(nn.Module):
    """HydraLoRA (Tian et al., NeurIPS 2024): one shared A, E heads B_j, a dense softmax router.

        y = W0 x + b + s * sum_j p_j(x) B_j A dropout(x),   p = softmax(G x),  s = alpha / r

    A (r, n) is Kaiming-uniform, every B_j (m, r) starts at zero (so the model starts at W0); all
    heads are computed at once: [p_1 h, ..., p_E h] (T, E r) @ [B_1^T; ...; B_E^T] (E r, m).
    """

    def __init__(self, base_layer: nn.Module, rank: int, num_experts: int, alpha: float, dropout: float, generator):
        super().__init__()
        if isinstance(base_layer, nn.Linear):
            in_features, out_features = base_layer.in_features, base_layer.out_features
        elif isinstance(base_layer, nn.Conv2d) and tuple(base_layer.kernel_size) == (1, 1) and base_layer.groups == 1:
            in_features, out_features = base_layer.in_channels, base_layer.out_channels
        else:
            raise ValueError(f"HydraLoRA cannot adapt {type(base_layer).__name__}; supported: nn.Linear, 1x1 nn.Conv2d")
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.num_experts, self.scaling = rank, num_experts, alpha / rank
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))  # shared
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank, device=device))  # one per expert
        self.router = nn.Linear(in_features, num_experts, bias=False, device=device)
        nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5), generator=generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("load_sums", torch.zeros(num_experts, dtype=torch.float64, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        conv = isinstance(self.base_layer, nn.Conv2d)
        tokens = (x.movedim(1, -1) if conv else x).reshape(-1, self.in_features).float()  # (T, n)
        probs = torch.softmax(self.router(tokens), dim=-1)  # (T, E)
        h = self.dropout(tokens) @ self.lora_A.T  # (T, r)
        mixed = (probs[:, :, None] * h[:, None, :]).reshape(len(tokens), -1)  # (T, E r)
        B_cat = self.lora_B.permute(0, 2, 1).reshape(-1, self.out_features)  # (E r, m)
        delta = self.scaling * mixed @ B_cat  # (T, m)
        self.load_sums += probs.detach().sum(0).double()
        if conv:
            batch, _, height, width = result.shape
            delta = delta.reshape(batch, height, width, self.out_features).movedim(-1, 1)
        else:
            delta = delta.reshape(result.shape)
        return result + delta.to(result.dtype)

    def expert_load(self) -> torch.Tensor:
        """Mean router probability per expert since the last reset (dense routing: no top-k)."""
        total = self.load_sums.sum()
        return self.load_sums / total if total > 0 else self.load_sums.clone()

    def reset_expert_load(self) -> None:
        self.load_sums.zero_()


def get_hydralora_model(model: nn.Module, settings, targets: list[str], head: list[str]) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    for index, name in enumerate(targets):
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
        layer = HydraLoraLayer(model.get_submodule(name), settings.rank, settings.experts, settings.lora_alpha,
                               settings.dropout, generator)  # fmt: skip
        layer.base_layer.requires_grad_(False)
        replace_module(model, name, layer)
    for name in head:
        model.get_submodule(name).requires_grad_(True)
    return model


# ---- expert-load access that works for every method -------------------------------------------
def expert_load(model: nn.Module) -> dict[str, list[float]]:
    """layer name -> fraction of tokens per expert (GOAT: top-k slots; HydraLoRA: mean router
    probability); empty for methods without a router."""
    from .model import GoatModel

    if isinstance(model, GoatModel):
        return {name: [float(v) for v in load] for name, load in model.expert_load().items()}
    return {
        name: [float(v) for v in module.expert_load()]
        for name, module in model.named_modules()
        if isinstance(module, HydraLoraLayer)
    }


def reset_expert_load(model: nn.Module) -> None:
    from .model import GoatModel

    if isinstance(model, GoatModel):
        model.reset_expert_load()
    for module in model.modules():
        if isinstance(module, HydraLoraLayer):
            module.reset_expert_load()


def recording_expert_load(model: nn.Module):
    """A context in which evaluation forwards (no autograd) count the experts' load too: GOAT skips that
    bookkeeping at inference unless asked (GoatModel.recording_routing); HydraLoRA always counts."""
    import contextlib

    from .model import GoatModel

    return model.recording_routing() if isinstance(model, GoatModel) else contextlib.nullcontext()
