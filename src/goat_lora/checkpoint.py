"""Saving and loading GOAT adapters in PEFT's layout: adapter_config.json + adapter_model.safetensors.

The safetensors file holds, per adapted layer, the trained `lora_A`, `lora_B`, `router.weight`, the
frozen initial factors `init_A`, `init_B` and scales `expert_scale` (so the residual W_res is
rebuilt bit-for-bit without an SVD), and a small `base_fingerprint` of the original weight (so an
adapter loaded onto another base model is refused). Quantized bases (goat_lora.quant): a config with
`quantize` rebuilds Q(W0 - W_res) from a full-precision base exactly (same float32 operations, same
codes); layers whose base arrived quantized are listed in adapter_config.json's `base_quantization`,
and loading requires a base quantized the same way (anything else is refused in one line).
Files are written to a temporary name and renamed, so a crash never leaves a half-written adapter.
adapter_config.json records the SHA-256 of the weights file (`weights_sha256`), so bytes changed
after saving (or a weights file that does not belong to this config) are refused on load instead of
silently giving other numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import safetensors.torch
import torch
from torch import nn

from . import __version__
from . import functional as F
from . import quant
from .config import GoatConfig
from .files import atomic_write_files
from .inject import find_modules_to_save, find_target_modules
from .layer import base_weight_2d, layer_shape, weight_fingerprint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = "GOAT"
_LAYER_KEYS = ("lora_A", "lora_B", "router.weight", "init_A", "init_B", "expert_scale", "base_fingerprint")


def _fingerprints_match(saved: torch.Tensor, current: torch.Tensor) -> bool:
    mean_abs = float(saved[1].abs())
    return torch.allclose(saved, current, rtol=2e-2, atol=1e-2 * mean_abs + 1e-8)


def save_adapter(model, save_directory: str | os.PathLike) -> None:
    os.makedirs(save_directory, exist_ok=True)
    tensors = model.trainable_state_dict()
    base_quantization = {}  # layers whose base arrived quantized: loading needs the same quantization
    for name, layer in model.named_goat_layers():
        if layer.original_fingerprint is not None:  # taken before the layer changed W0 (quantized bases)
            tensors[f"{name}.base_fingerprint"] = layer.original_fingerprint
        else:
            original = base_weight_2d(layer.base_layer).float() + layer.residual().to(layer.base_layer.weight.device)
            tensors[f"{name}.base_fingerprint"] = weight_fingerprint(original)
        if layer.residual_at_runtime:
            base_quantization[name] = quant.layer_quantization(layer.base_layer)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", "goat_lora_version": __version__}
    weights = safetensors.torch.save(tensors, metadata=metadata)
    layers = {name: list(layer_shape(layer.base_layer)) for name, layer in model.named_goat_layers()}
    extra = {
        "peft_type": PEFT_TYPE,
        "goat_lora_version": __version__,
        "layers": layers,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    if base_quantization:  # absent: every base layer was full precision (or GOAT quantized it: config.quantize)
        extra["base_quantization"] = base_quantization
    config_text = model.goat_config.to_json_text(extra=extra)
    # Both files are staged before either replaces the old one; if the process dies between the two
    # renames, the config's checksum refuses the mismatched pair on load.
    atomic_write_files(
        {
            os.path.join(save_directory, WEIGHTS_NAME): weights,
            os.path.join(save_directory, CONFIG_NAME): config_text.encode("utf-8"),
        }
    )


def read_adapter_files(adapter_directory: str | os.PathLike) -> tuple[GoatConfig, dict[str, torch.Tensor], dict]:
    """The config, tensors and metadata (adapter_config.json as read) of a saved adapter, with a clear
    error for each way they can be bad."""
    folder = str(adapter_directory)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"adapter directory {folder!r} does not exist")
    config_path = os.path.join(folder, CONFIG_NAME)
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"adapter file {path!r} is missing")
    config = GoatConfig.load(config_path)
    with open(config_path, encoding="utf-8") as fh:
        metadata = json.load(fh)
    expected_sha256 = metadata.get("weights_sha256")  # absent in adapters saved before it existed
    with open(weights_path, "rb") as fh:
        weights = fh.read()
    if expected_sha256 is not None and hashlib.sha256(weights).hexdigest() != expected_sha256:
        raise ValueError(
            f"adapter weights {weights_path!r} do not match the weights_sha256 of adapter_config.json (changed or "
            f"corrupted after saving, or from another save); delete weights_sha256 from the config to load them anyway"
        )
    try:
        tensors = safetensors.torch.load(weights)
    except Exception as err:  # safetensors raises its own error types for truncated / corrupt files
        raise ValueError(f"adapter weights {weights_path!r} are unreadable (truncated or corrupt): {err}") from None
    return config, tensors, metadata


def _check_base_quantization(name: str, module: nn.Module, config: GoatConfig, saved: str | None) -> None:
    """The base layer must hold what the adapter was trained on: a full-precision W0 where GOAT quantizes
    it (config.quantize) or where it was full precision, the same bitsandbytes quantization where the base
    arrived quantized. Another quantization moves the frozen base by about its quantization error (4-bit:
    9% of |W0|, docs/benchmarks.md), which the trained adapters never saw: refused, not approximated."""
    current = quant.layer_quantization(module)
    if config.quantize is not None and current is not None:
        raise ValueError(
            f"the adapter quantizes its base itself (quantize={config.quantize!r}: Q(W0 - W_res) from float32); load "
            f"it onto the full-precision base model, not onto one whose layer {name!r} is already bitsandbytes "
            f"{current}"
        )
    if saved != current:

        def describe(kind: str | None) -> str:
            return f"a bitsandbytes {kind}" if kind else "a full-precision"

        raise ValueError(
            f"adapter layer {name!r} was trained on {describe(saved)} base layer, but this base's layer is "
            f"{describe(current)} one; load it onto a base {'quantized the same way' if saved else 'in full precision'}"
        )


def _check_layer_tensors(
    name: str, layer_tensors: dict[str, torch.Tensor], config: GoatConfig, out_features: int, in_features: int
) -> None:
    """The saved tensors of one layer must agree with the config (r, num_experts) and with each other."""
    rank, num_experts = layer_tensors["init_A"].shape[0], layer_tensors["expert_scale"].numel()
    if rank != config.r:
        raise ValueError(
            f"adapter_config.json says r={config.r}, but the saved weights of layer {name!r} have rank {rank}"
        )
    if num_experts != config.num_experts:
        raise ValueError(
            f"adapter_config.json says num_experts={config.num_experts}, but the saved weights of layer "
            f"{name!r} have {num_experts} experts"
        )
    expected = {
        "lora_A": (rank, in_features),
        "lora_B": (out_features, rank),
        "router.weight": (config.num_routed_experts, in_features),  # E - 1 outputs in "shared" mode
        "init_A": (rank, in_features),
        "init_B": (out_features, rank),
        "expert_scale": (num_experts,),
    }
    for key, shape in expected.items():
        if tuple(layer_tensors[key].shape) != shape:
            raise ValueError(
                f"adapter weights {name}.{key} has shape {tuple(layer_tensors[key].shape)}, expected {shape}; "
                f"the file does not match its adapter_config.json"
            )


def _saved_module_state(base_model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved state of one of modules_to_save, checked (keys and shapes) against the base model's module."""
    prefix = f"{name}."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    current = base_model.get_submodule(name).state_dict()
    if set(state) != set(current):
        missing, unexpected = sorted(set(current) - set(state))[:3], sorted(set(state) - set(current))[:3]
        raise ValueError(
            f"saved module {name!r} does not fit this base model: missing {missing}, unexpected {unexpected}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise ValueError(
                f"saved module {name!r} does not fit this base model: {key} has shape {tuple(value.shape)}, "
                f"the base model's has {tuple(current[key].shape)}"
            )
    return state


@dataclass
class SavedAdapter:
    """A saved adapter read and checked against a base model, which is not changed yet."""

    config: GoatConfig
    targets: list[str]  # the base model's layers to adapt, in model order
    factors: dict[str, tuple[F.ExpertFactors, torch.Tensor]]  # layer -> (initial factors, router weight)
    trained: dict[str, dict[str, torch.Tensor]]  # layer -> {"lora_A", "lora_B"}
    module_states: dict[str, dict[str, torch.Tensor]]  # modules_to_save -> their saved state


def read_adapter(base_model: nn.Module, adapter_directory: str | os.PathLike) -> SavedAdapter:
    """Read a saved adapter and check every tensor against `base_model` (shapes, weight fingerprints,
    modules_to_save) without changing the model: a failed check leaves it as it was."""
    config, tensors, metadata = read_adapter_files(adapter_directory)
    saved_quantization = metadata.get("base_quantization") or {}  # absent: every base layer full precision
    targets = find_target_modules(base_model, config)
    saved_layers = sorted({key[: -len(".lora_A")] for key in tensors if key.endswith(".lora_A")})
    if sorted(targets) != saved_layers:
        missing = sorted(set(saved_layers) - set(targets))[:3]
        extra = sorted(set(targets) - set(saved_layers))[:3]
        raise ValueError(
            f"adapter in {str(adapter_directory)!r} does not fit this base model: adapted layers "
            f"{missing} are not in it and its layers {extra} have no adapter (another architecture?)"
        )
    factors: dict[str, tuple[F.ExpertFactors, torch.Tensor]] = {}
    trained: dict[str, dict[str, torch.Tensor]] = {}
    for name in targets:
        layer_tensors = {}
        for key in _LAYER_KEYS:
            if f"{name}.{key}" not in tensors:
                raise ValueError(f"adapter weights lack {name}.{key}; the file is incomplete")
            layer_tensors[key] = tensors[f"{name}.{key}"]
        module = base_model.get_submodule(name)
        out_features, in_features = layer_shape(module)
        init_A, init_B = layer_tensors["init_A"], layer_tensors["init_B"]
        if init_A.shape[1] != in_features or init_B.shape[0] != out_features:
            raise ValueError(
                f"adapter layer {name!r} was saved for shape (out={init_B.shape[0]}, in={init_A.shape[1]}), "
                f"but this base model's layer has (out={out_features}, in={in_features})"
            )
        _check_layer_tensors(name, layer_tensors, config, out_features, in_features)
        _check_base_quantization(name, module, config, saved_quantization.get(name))
        if not _fingerprints_match(layer_tensors["base_fingerprint"], weight_fingerprint(base_weight_2d(module))):
            raise ValueError(
                f"adapter layer {name!r} was trained on other base weights than this model's "
                f"(weight fingerprint differs); load it onto the base model it was trained from"
            )
        factors[name] = (F.ExpertFactors(init_A, init_B, layer_tensors["expert_scale"]), layer_tensors["router.weight"])
        trained[name] = {"lora_A": layer_tensors["lora_A"], "lora_B": layer_tensors["lora_B"]}
    module_states = {
        name: _saved_module_state(base_model, name, tensors) for name in find_modules_to_save(base_model, config)
    }
    return SavedAdapter(config, targets, factors, trained, module_states)
