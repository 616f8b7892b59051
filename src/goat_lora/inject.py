"""Finding the layers to adapt, computing their initial expert factors, and swapping in GoatLayers."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from . import functional as F
from . import quant
from .config import GoatConfig, InitMode
from .svd import batched_singular_components, singular_components
from .layer import SUPPORTED_LAYER_TYPES, Conv1D, GoatLayer, base_weight_2d, is_supported_layer, layer_shape

# Classification heads that "all-linear" leaves alone (peft does the same for sequence classifiers).
CLASSIFIER_HEAD_NAMES = ("classifier", "score")


def _name_matches(name: str, spec: str | list[str]) -> bool:
    """A string is a regex that must match the whole name; a list holds names or name suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == target or name.endswith("." + target) for target in spec)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def find_modules_to_save(model: nn.Module, config: GoatConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [name for name, _ in model.named_modules() if name and _name_matches(name, config.modules_to_save)]
    # keep the outermost match only (a head and its sub-layers are saved once)
    names = [n for n in names if not _under(n, [p for p in names if p != n])]
    if not names:
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module of {type(model).__name__}")
    return names


def find_target_modules(model: nn.Module, config: GoatConfig) -> list[str]:
    """Names of the modules to adapt, in model order; a clear ValueError when none or a wrong type."""
    adapted = [name for name, module in model.named_modules() if isinstance(module, GoatLayer)]
    if adapted:  # its routers and base layers are nn.Linear too; adapting them would nest adapters
        raise ValueError(f"module {adapted[0]!r} is already a GoatLayer; unload() the model before adapting it again")
    saved = find_modules_to_save(model, config)
    excluded_prefixes = list(saved)
    spec = config.target_modules
    if spec == "all-linear":
        get_output = getattr(model, "get_output_embeddings", None)
        output_head = get_output() if callable(get_output) else None
        for name, module in model.named_modules():
            if module is output_head or (name in CLASSIFIER_HEAD_NAMES):  # top-level heads only
                excluded_prefixes.append(name)
        # other libraries' quantized linear layers (GPTQ, AWQ, ...) are candidates too, to be refused by name below
        candidates = [
            name
            for name, module in model.named_modules()
            if _is_linear(module) or quant.unsupported_quantization(module) is not None
        ]
    else:
        candidates = [name for name, _ in model.named_modules() if name and _name_matches(name, spec)]
    targets = [
        name
        for name in candidates
        if not _under(name, excluded_prefixes)
        and not (config.exclude_modules is not None and _name_matches(name, config.exclude_modules))
    ]
    if not targets:
        linear_names = [n for n, m in model.named_modules() if is_supported_layer(m)][:8]
        raise ValueError(
            f"target_modules={spec!r} matched no adaptable module of {type(model).__name__}; "
            f"adaptable modules include {linear_names}"
        )
    modules = dict(model.named_modules())
    for name in targets:
        kind = quant.unsupported_quantization(modules[name])
        if kind is not None:
            raise ValueError(
                f"target module {name!r} is a {kind} quantized layer, which GOAT cannot adapt; "
                f"supported quantized layers: {quant.SUPPORTED_QUANTIZED}"
            )
        if not is_supported_layer(modules[name]):
            raise ValueError(
                f"target module {name!r} is a {type(modules[name]).__name__}, which GOAT cannot adapt; "
                f"supported: {SUPPORTED_LAYER_TYPES}"
            )
    return targets


def layer_generator(seed: int, layer_index: int) -> torch.Generator:
    """One seeded generator per layer, so a layer's init does not depend on how many came before."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer_index)


def _plan_factors(name: str, module: nn.Module, config: GoatConfig, generator: torch.Generator):
    """Everything of one layer's init except the SVD: (scale, component indices (E, d), weight), or
    the finished factors for init="zero". Draws from `generator` in the same order as always
    (indices first; GoatLayer then draws the router), so batching changes no result."""
    out_features, in_features = layer_shape(module)
    expert_rank, num_experts = config.expert_rank, config.num_experts
    scale = F.scaling_factor(config.scaling, in_features, expert_rank, config.eta, config.lora_alpha)
    if config.init == InitMode.ZERO.value:
        return F.zero_expert_factors(out_features, in_features, config.r, num_experts, scale, generator)
    weight = base_weight_2d(module).detach()
    if not torch.isfinite(torch.linalg.vector_norm(weight, float("inf"))):  # max |w| is NaN or inf if any entry is
        raise ValueError(f"layer {name!r} has NaN or inf in its weight; GOAT cannot initialise from it")
    try:
        indices = F.expert_component_indices(
            config.init, min(out_features, in_features), num_experts, expert_rank, generator
        )
    except ValueError as err:
        raise ValueError(f"layer {name!r} (out={out_features}, in={in_features}): {err}") from None
    return scale, indices, weight


def _finish_factors(config: GoatConfig, scale: float, U, S, V) -> F.ExpertFactors:
    if config.per_expert_scaling:
        scales = F.per_expert_scales(scale, S.reshape(config.num_experts, config.expert_rank).cpu())
    else:
        scales = torch.full((config.num_experts,), float(scale))
    return F.svd_expert_factors(U.cpu(), S.cpu(), V.cpu(), scales, config.rho)


def initial_factors(name: str, module: nn.Module, config: GoatConfig, generator: torch.Generator) -> F.ExpertFactors:
    """The experts' starting factors for one layer (see `all_initial_factors` for many at once)."""
    plan = _plan_factors(name, module, config, generator)
    if isinstance(plan, F.ExpertFactors):
        return plan
    scale, indices, weight = plan
    U, S, V = singular_components(weight, indices.reshape(-1), config.svd_method)
    return _finish_factors(config, scale, U, S, V)


def all_initial_factors(
    modules: dict[str, nn.Module], config: GoatConfig, generators: dict[str, torch.Generator]
) -> dict[str, F.ExpertFactors]:
    """Initial factors of many layers: weights of one shape, dtype and device share batched
    Gram eigendecompositions (svd.batched_singular_components); the result per layer is the one
    `initial_factors` gives (the same numbers for "exact"; for "gram" up to eigh's batch rounding)."""
    factors: dict[str, F.ExpertFactors] = {}
    groups: dict[tuple, list[tuple[str, float, torch.Tensor, torch.Tensor]]] = {}
    for name, module in modules.items():
        plan = _plan_factors(name, module, config, generators[name])
        if isinstance(plan, F.ExpertFactors):
            factors[name] = plan
            continue
        scale, indices, weight = plan
        key = (tuple(weight.shape), weight.dtype, weight.device)
        groups.setdefault(key, []).append((name, scale, indices.reshape(-1), weight))
    for members in groups.values():
        weights = [weight for _, _, _, weight in members]
        indices = torch.stack([idx for _, _, idx, _ in members])  # (N, K)
        results = batched_singular_components(weights, indices, config.svd_method)
        for (name, scale, _, _), (U, S, V) in zip(members, results):
            factors[name] = _finish_factors(config, scale, U, S, V)
    return {name: factors[name] for name in modules}


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new_module)


def inject_goat_layers(
    model: nn.Module,
    config: GoatConfig,
    targets: list[str],
    saved_factors: dict[str, tuple[F.ExpertFactors, torch.Tensor]] | None = None,
) -> dict[str, GoatLayer]:
    """Swap each target for a GoatLayer. Factors come from the SVD, or from `saved_factors`
    (name -> (initial factors, router weight)) when loading a checkpoint: then no SVD runs."""
    layers: dict[str, GoatLayer] = {}
    spec = quant.spec_from_config(config)
    if spec is not None:  # before any SVD: bitsandbytes is there, and every target is a full-precision nn.Linear
        quant.bitsandbytes()
        for name in targets:
            module = model.get_submodule(name)
            if quant.is_quantized_layer(module):
                raise ValueError(
                    f"GoatConfig.quantize={spec.kind!r} quantizes a full-precision base; layer {name!r} is already "
                    f"bitsandbytes {quant.layer_quantization(module)}: adapt it with quantize=None (W_res x is then "
                    f"subtracted at run time)"
                )
            if type(module) is not nn.Linear:
                raise ValueError(
                    f"GoatConfig.quantize={spec.kind!r}: bitsandbytes quantizes nn.Linear layers only; "
                    f"layer {name!r} is a {type(module).__name__}"
                )
    generators = {name: layer_generator(config.seed, index) for index, name in enumerate(targets)}
    if saved_factors is None:  # all SVDs first, batched over layers of equal shape
        computed = all_initial_factors({name: model.get_submodule(name) for name in targets}, config, generators)
    for name in targets:
        module = model.get_submodule(name)
        generator = generators[name]
        if saved_factors is None:
            factors, router_weight = computed[name], None
        else:
            factors, router_weight = saved_factors[name]
        layer = GoatLayer(
            module,
            factors,
            top_k=config.top_k,
            residual_coef=config.residual_coefs,
            routing=config.routing,
            top_p=config.top_p,
            dropout=config.dropout,
            aux_loss_form=config.aux_loss_form,
            router_weight=router_weight,
            generator=generator,
            quantize=spec,
        )
        replace_module(model, name, layer)
        layers[name] = layer
    return layers
