r"""Quantized base layers (bitsandbytes 4-bit and 8-bit): recognising them, reading W0 out of them,
building them. bitsandbytes is an optional extra: ``pip install goat-lora[quant]``.

GOAT's frozen base is a residual, ``W0 - W_res``, as PiSSA's is. A quantized base meets it in one of
two ways (docs/design.md, "Quantized bases", has the numbers behind the choice):

* **GOAT quantizes the base itself** (``GoatConfig(quantize="nf4" | "fp4" | "int8")``, QPiSSA's order):
  the expert factors come from the full-precision ``W0`` in float32, and the frozen base becomes
  ``Q(W0 - W_res)``, quantized once, from float32. ``W_res`` lives inside the quantized weight, as it
  lives inside the float weight of an unquantized GoatLayer.
* **The base arrives quantized** (transformers' ``BitsAndBytesConfig``): the factors come from the
  dequantized ``W_q``; the layer keeps ``W_q`` untouched and subtracts ``W_res x`` at run time
  (``GoatLayer.residual_forward``). Re-quantizing ``deq(W_q) - W_res`` instead would round most of the
  small ``W_res`` away again.

Kinds: ``nf4`` and ``fp4`` (bitsandbytes ``Linear4bit``, blocks of 64 weights with one absmax each;
``double_quant`` also quantizes the absmaxes, QLoRA's "double quantization") and ``int8``
(``Linear8bitLt``, LLM.int8(): one absmax per output row). Other quantized layers (GPTQ, AWQ, HQQ,
quanto, torchao, ...) are refused by name (``unsupported_quantization``).
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
from torch import nn

from .config import GoatConfig, QuantizeKind

QUANTIZE_KINDS = tuple(kind.value for kind in QuantizeKind)
INSTALL_HINT = "pip install goat-lora[quant]"
LLM_INT8_THRESHOLD = 6.0  # transformers' default llm_int8_threshold (outlier activations computed in fp16)


class QuantSpec(NamedTuple):
    """How GOAT quantizes a base weight: kind "nf4" | "fp4" | "int8"; for 4-bit, double quantization of the
    block absmaxes and the block size."""

    kind: str
    double_quant: bool = True
    blocksize: int = 64


def spec_from_config(config: GoatConfig) -> QuantSpec | None:
    """The QuantSpec of GoatConfig.quantize / double_quant, or None when GOAT does not quantize."""
    return None if config.quantize is None else QuantSpec(config.quantize, config.double_quant)


def bitsandbytes():
    """The bitsandbytes module, or an ImportError whose one line names the extra to install."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError(f"quantized bases need bitsandbytes ({err}); install it with: {INSTALL_HINT}") from None
    return bnb


# ---- recognising layers ---------------------------------------------------------------------------
def _bnb_classes() -> tuple[type, type] | None:
    """(Linear4bit, Linear8bitLt) when bitsandbytes is loaded; no bitsandbytes layer exists otherwise."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def is_quantized_layer(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit or Linear8bitLt (the quantized layers GOAT adapts)."""
    classes = _bnb_classes()
    return classes is not None and isinstance(module, classes)


def layer_quantization(module: nn.Module) -> str | None:
    """A short name of how a supported layer's weight is stored, compared when an adapter is loaded:
    "nf4", "nf4+dq" (double quantization), "fp4", "fp4+dq" (with "/b<blocksize>" when not 64), "int8";
    None for a full-precision layer. A bitsandbytes layer whose weight is not quantized yet is refused."""
    classes = _bnb_classes()
    if classes is None or not isinstance(module, classes):
        return None
    linear4bit, _ = classes
    weight = module.weight
    if isinstance(module, linear4bit):
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError(
                f"{type(module).__name__} holds a weight that is not quantized yet (bitsandbytes quantizes on "
                f".to(device)); move the model to its device before adapting it"
            )
        name = state.quant_type + ("+dq" if state.nested else "")
        return name + ("" if state.blocksize == 64 else f"/b{state.blocksize}")
    if weight.dtype != torch.int8:
        raise ValueError(
            f"Linear8bitLt holds {weight.dtype} weights (has_fp16_weights=True or not moved to a device yet); "
            f"GOAT adapts int8-quantized Linear8bitLt layers"
        )
    return "int8"


# Where quantized layers of other libraries come from: (class module prefix or class name, what to call it).
_OTHER_QUANTIZERS = (
    ("auto_gptq", "GPTQ"),
    ("gptqmodel", "GPTQ"),
    ("optimum.gptq", "GPTQ"),
    ("awq", "AWQ"),
    ("hqq", "HQQ"),
    ("optimum.quanto", "quanto"),
    ("quanto", "quanto"),
    ("torchao", "torchao"),
    ("torch.ao.nn.quantized", "torch.ao"),
    ("eetq", "EETQ"),
    ("aqlm", "AQLM"),
    ("vptq", "VPTQ"),
    ("compressed_tensors", "compressed-tensors"),
    ("fbgemm_gpu", "FBGEMM FP8"),
)
_OTHER_CLASS_NAMES = (
    ("QuantLinear", "GPTQ"),
    ("WQLinear", "AWQ"),
    ("HQQLinear", "HQQ"),
    ("QLinear", "quanto"),
    ("FP8Linear", "FP8"),
)


def unsupported_quantization(module: nn.Module) -> str | None:
    """The name of a quantization GOAT cannot adapt ("GPTQ (QuantLinear)", ...), or None. bitsandbytes'
    Linear4bit / Linear8bitLt are supported; its other layer types are not."""
    cls = type(module)
    where = cls.__module__ or ""
    if is_quantized_layer(module):
        return None
    if where.startswith("bitsandbytes"):
        return f"bitsandbytes {cls.__name__}"
    for prefix, name in _OTHER_QUANTIZERS:
        if where == prefix or where.startswith(prefix + "."):
            return f"{name} ({cls.__name__})"
    for class_name, name in _OTHER_CLASS_NAMES:
        if class_name in cls.__name__:
            return f"{name} ({cls.__name__})"
    if any(hasattr(module, attr) for attr in ("qweight", "qzeros", "weight_packed")):  # packed integer weights
        return f"quantized ({cls.__name__})"
    return None


SUPPORTED_QUANTIZED = "bitsandbytes Linear4bit (nf4, fp4, with or without double quantization) and Linear8bitLt (int8)"


# ---- W0 out of a quantized layer --------------------------------------------------------------------
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """W_q as float32 (m, n): the 4-bit codes times their (double-quantized) block absmax, or the int8
    codes times their row's absmax / 127 (bitsandbytes' own dequantization)."""
    bnb = bitsandbytes()
    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(*_common_layout(weight)).float()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB  # moved at the first forward
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.data.device)).float()


# ---- building a quantized layer ----------------------------------------------------------------------
def keep_reference_cpu_path(module: nn.Module) -> None:
    """Make a bitsandbytes Linear4bit compute as it does on every machine: dequantize, then matmul in its
    compute dtype. On CPUs with AVX512-BF16, bitsandbytes 0.50 instead repacks the weight in place at the
    first forward in eval mode without gradients and computes in bfloat16 from then on: evaluation then
    differs from training by bfloat16 rounding, and the next training step fails inside bitsandbytes
    (an in-place operation on a view of a leaf). Training evaluates every epoch, so keep the common path."""
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        weight.data, weight.quant_state = _common_layout(weight)  # undone if evaluated before GOAT adapted it


def _common_layout(weight: torch.Tensor) -> tuple[torch.Tensor, object]:
    """(codes, quant_state) of a 4-bit weight in bitsandbytes' common layout, undoing the repacking its
    AVX512-BF16 CPU kernel does at an eval forward (keep_reference_cpu_path); unchanged otherwise."""
    if not getattr(weight.quant_state, "packing_format_for_cpu", False):
        return weight.data, weight.quant_state
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec, compute_dtype: torch.dtype
) -> nn.Module:
    """A bitsandbytes layer holding Q(weight) for a float32 (m, n) `weight`, quantized from float32 on the
    weight's device (int8: bitsandbytes' own route, through float16), with `bias` kept as it is.
    4-bit layers compute in `compute_dtype` (the dtype the full-precision layer had)."""
    bnb = bitsandbytes()
    out_features, in_features = weight.shape
    device = weight.device
    if spec.kind == "int8":
        layer = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=bias is not None,
            has_fp16_weights=False,
            threshold=LLM_INT8_THRESHOLD,
            device="meta",
        )
        param = bnb.nn.Int8Params(weight.detach().contiguous(), requires_grad=False, has_fp16_weights=False)
        layer.weight = param._quantize(device)
    elif spec.kind in ("nf4", "fp4"):
        options = dict(compress_statistics=spec.double_quant, quant_type=spec.kind)
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype, device="meta", **options
        )
        param = bnb.nn.Params4bit(
            weight.detach().contiguous(), requires_grad=False, blocksize=spec.blocksize, module=layer, **options
        )
        layer.weight = param._quantize(device)
        keep_reference_cpu_path(layer)
    else:
        raise ValueError(f"quantize={spec.kind!r} is not allowed; choose one of {', '.join(QUANTIZE_KINDS)}")
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def quantization_error(weight: torch.Tensor, spec: QuantSpec) -> float:
    """|deq(Q(W)) - W|_F / |W|_F for a float32 (m, n) W: the relative error the quantized base carries."""
    weight = weight.detach().float()
    quantized = dequantized_weight(quantize_linear(weight, None, spec, torch.float32))
    return float(torch.linalg.norm(quantized.double() - weight.double()) / torch.linalg.norm(weight.double()))


def quantize_modules(model: nn.Module, names: list[str], spec: QuantSpec) -> None:
    """Replace each named nn.Linear of `model`, in place, by a bitsandbytes layer holding Q(W0): the
    base of QLoRA and its kin (transformers' BitsAndBytesConfig builds the same layers when loading).
    Checks every layer first, so a refused one leaves the model unchanged."""
    bitsandbytes()
    modules = [(name, model.get_submodule(name)) for name in names]
    for name, module in modules:
        if type(module) is not nn.Linear:
            raise ValueError(
                f"--quantize {spec.kind}: bitsandbytes quantizes nn.Linear layers only; layer {name!r} is "
                f"a {type(module).__name__}"
            )
    for name, module in modules:
        weight = module.weight
        quantized = quantize_linear(weight.detach().float(), module.bias, spec, compute_dtype=weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)


def quant_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a bitsandbytes layer keeps beside its codes (absmaxes, code book, nested statistics;
    int8: the row scales), which are neither parameters nor buffers: memory accounting needs them."""
    if not is_quantized_layer(module):
        return []
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        tensors = [state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code]
        return [t for t in tensors if t is not None]
    scb = getattr(weight, "SCB", None)
    scb = scb if scb is not None else getattr(module.state, "SCB", None)
    return [scb] if scb is not None else []
