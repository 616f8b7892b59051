"""GOAT on a quantized base: bitsandbytes 4-bit (nf4, fp4, with and without double
quantization) and 8-bit, on the CPU.

Two routes (goat_lora.quant): GOAT quantizes the base itself (GoatConfig.quantize: Q(W0 - W_res) from
float32, QPiSSA's order), or adapts a base that arrives quantized (transformers' BitsAndBytesConfig),
keeping W_q and subtracting W_res x at run time. Tiny seeded models; everything but the two end-to-end
command-line tests takes seconds. Tests that need bitsandbytes skip without it (the CPU wheel ships
with the `quant` extra, which scripts/install.sh installs).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from goat_lora import GoatConfig, GoatModel, get_goat_model
from goat_lora import quant
from goat_lora.layer import GoatLayer, base_weight_2d
from goat_lora.testing import TinyMLP, save_word_bert, tiny_convnet, tiny_llama

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install goat-lora[quant])",
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ["nf4", "fp4", "int8"]
# transformers' BitsAndBytesConfig for each way a base can arrive quantized, and the name GOAT gives it
LOADED = {
    "nf4+dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "fp4+dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
CONFIG = dict(r=8, num_experts=4, dropout=0.0)


def ids(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(1))


def zero_routers(model: GoatModel) -> None:
    for layer in model.goat_layers():
        nn.init.zeros_(layer.router.weight)


def equivalent_weight(layer: GoatLayer) -> torch.Tensor:
    """With a zero router and k = E every expert has weight 1/E = c: the layer computes
    deq(base) x + b + (sum_j c s_j B_j A_j - [W_res if at run time]) x."""
    weight = base_weight_2d(layer.base_layer).float()
    return weight if layer.residual_at_runtime else weight + layer.residual()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("quant") / "tiny-llama"
    tiny_llama(hidden=64).save_pretrained(str(folder))
    return str(folder)


def load_quantized(folder: str, name: str, compute_dtype=torch.float32):
    """The tiny LLaMA as transformers loads it onto a bitsandbytes base (the head, lm_head, stays float)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    options = dict(LOADED[name])
    if options.get("load_in_4bit"):
        options["bnb_4bit_compute_dtype"] = compute_dtype
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(**options), dtype=torch.float32
    )
    return model.eval()


def load_full(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ---- the quantizer --------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize(
    "kind,double_quant,name",
    [("nf4", True, "nf4+dq"), ("nf4", False, "nf4"), ("fp4", True, "fp4+dq"), ("int8", True, "int8")],
)
def test_quantize_linear_holds_the_dequantized_weight(kind, double_quant, name):
    """quantize_linear -> a bitsandbytes layer computing deq(Q(W)) x + b (4-bit exactly, int8 within its
    fp16 route), named as transformers' layers are; its error is the kind's (nf4 ~9%, int8 < 1%)."""
    weight, bias = torch.randn(48, 64) * 0.05, torch.randn(48)
    layer = quant.quantize_linear(weight, bias, quant.QuantSpec(kind, double_quant), torch.float32)
    assert quant.layer_quantization(layer) == name and not layer.weight.requires_grad and not layer.bias.requires_grad
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ quant.dequantized_weight(layer).T + bias, atol=1e-5, rtol=1e-4)
    error = quant.quantization_error(weight, quant.QuantSpec(kind, double_quant))
    assert (0.05 < error < 0.15) if kind != "int8" else (error < 0.01)


@needs_bnb
def test_transformers_loaded_layers_are_recognised(llama_dir):
    for name in LOADED:
        model = load_quantized(llama_dir, name)
        q_proj = model.model.layers[0].self_attn.q_proj
        assert quant.layer_quantization(q_proj) == name
        assert quant.layer_quantization(model.lm_head) is None  # kept in full precision
        full = load_full(llama_dir).model.layers[0].self_attn.q_proj.weight
        assert quant.quantization_error(full, quant.QuantSpec("nf4")) > 0  # and dequantizing reads W_q back:
        relative = float((quant.dequantized_weight(q_proj) - full).norm() / full.norm())
        assert relative < (0.15 if name != "int8" else 0.01)


# ---- GOAT quantizes its own base (QPiSSA's order) -----------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
def test_goat_quantizes_w0_minus_w_res_and_starts_within_the_quantization_error(kind):
    """Each adapted layer holds Q(W0 - W_res), quantized from float32, and computes exactly
    (deq(Q(W0 - W_res)) + W_res) x + b at init (zero router, k = E). Bound tested: that equivalent
    weight is within 1.05 x QLoRA's own error |deq(Q(W0)) - W0|_F of W0, layer by layer."""
    base = tiny_llama(hidden=64)
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if type(m) is nn.Linear}
    model = get_goat_model(copy.deepcopy(base), GoatConfig(quantize=kind, top_k=4, **CONFIG))
    zero_routers(model)
    model.eval()
    for name, layer in model.named_goat_layers():
        W0 = originals[name]
        assert quant.layer_quantization(layer.base_layer).startswith(kind) and not layer.residual_at_runtime
        target = W0 - layer.residual()
        expected = quant.quantize_linear(target, None, quant.QuantSpec(kind), torch.float32)
        assert torch.equal(base_weight_2d(layer.base_layer), quant.dequantized_weight(expected))
        x = torch.randn(7, W0.shape[1])
        y, expected_y = layer(x), x @ equivalent_weight(layer).T
        if kind == "int8":  # in eval LLM.int8() quantizes the activations too (per token, absmax / 127)
            assert torch.linalg.norm(y - expected_y) <= 2e-2 * torch.linalg.norm(expected_y)
        else:
            torch.testing.assert_close(y, expected_y, atol=2e-5, rtol=1e-4)
        qlora_error = torch.linalg.norm(
            quant.dequantized_weight(quant.quantize_linear(W0, None, quant.QuantSpec(kind), torch.float32)) - W0
        )
        assert torch.linalg.norm(equivalent_weight(layer) - W0) <= 1.05 * qlora_error, name
    assert model(ids()).logits.isfinite().all()


@needs_bnb
def test_quantized_base_keeps_the_compute_dtype_and_float32_adapters():
    base = tiny_llama(hidden=64).to(torch.bfloat16)
    model = get_goat_model(base, GoatConfig(quantize="nf4", **CONFIG))
    layer = next(model.goat_layers())
    assert layer.base_layer.compute_dtype == torch.bfloat16  # the dtype the full-precision layer had
    assert layer.lora_A.dtype == layer.router.weight.dtype == layer.init_A.dtype == torch.float32
    assert model(ids()).logits.dtype == torch.bfloat16


@needs_bnb
def test_quantize_refuses_layers_bitsandbytes_cannot_hold():
    with pytest.raises(ValueError, match=r"bitsandbytes quantizes nn.Linear layers only; layer 'pw1' is a Conv2d"):
        get_goat_model(tiny_convnet(), GoatConfig(r=4, num_experts=2, quantize="nf4", target_modules=["pw1", "pw2"]))
    model = TinyMLP()
    quant.quantize_modules(model, ["fc1"], quant.QuantSpec("nf4"))
    with pytest.raises(ValueError, match=r"layer 'fc1' is already bitsandbytes nf4\+dq: adapt it with quantize=None"):
        get_goat_model(model, GoatConfig(r=4, num_experts=2, quantize="nf4"))


@needs_bnb
@pytest.mark.parametrize("route", ["goat quantizes nf4", "loaded nf4+dq"])
def test_evaluation_between_training_steps_keeps_the_float_path(llama_dir, route):
    """Training evaluates every epoch. On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's
    weight in place at the first no-grad eval forward and computes in bfloat16 from then on, after which
    a training step fails inside bitsandbytes. GOAT keeps bitsandbytes' common path on its 4-bit bases
    (quant.keep_reference_cpu_path), unpacking a loaded base evaluated before: eval without gradients
    gives the training-mode logits (dropout 0) and training goes on. (On CPUs without AVX512-BF16
    bitsandbytes takes that path anyway.)"""
    if route == "loaded nf4+dq":
        quantized = load_quantized(llama_dir, "nf4+dq")
        with torch.no_grad():  # evaluated before it is adapted: repacked there, unpacked by GOAT
            quantized(ids())
        model = get_goat_model(quantized, GoatConfig(**CONFIG))
    else:
        model = get_goat_model(load_full(llama_dir), GoatConfig(quantize="nf4", **CONFIG))
    layers = [layer.base_layer for layer in model.goat_layers()]
    assert layers and all(getattr(layer, "support_avx512bf16_for_cpu", False) is False for layer in layers)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):  # a step, an evaluation without gradients, a step
        model.train()
        model(ids(), labels=ids()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        training_logits = model(ids()).logits.detach()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ids()).logits, training_logits, atol=1e-5, rtol=1e-5)


# ---- a base that arrives quantized: W_res x at run time --------------------------------------------
@needs_bnb
@pytest.mark.parametrize("name", list(LOADED))
def test_loaded_quantized_base_starts_exactly_at_the_quantized_model(llama_dir, name):
    """A transformers-loaded bitsandbytes base is kept (its codes untouched) and W_res x is subtracted at
    run time: with a zero router and k = E the adapted model's logits are the quantized model's."""
    quantized = load_quantized(llama_dir, name)
    expected = quantized(ids()).logits
    codes = quantized.model.layers[0].mlp.down_proj.weight.detach().clone()
    model = get_goat_model(quantized, GoatConfig(top_k=4, **CONFIG))
    zero_routers(model)
    model.eval()
    layer = model.base_model.model.layers[0].mlp.down_proj
    assert layer.residual_at_runtime and torch.equal(layer.base_layer.weight.detach(), codes)
    torch.testing.assert_close(model(ids()).logits, expected, atol=1e-5, rtol=1e-5)


@needs_bnb
def test_runtime_residual_is_w_res_x_from_the_frozen_factors():
    layer = next(get_goat_model(tiny_llama(hidden=64), GoatConfig(**CONFIG)).goat_layers())
    tokens = torch.randn(6, layer.in_features)
    torch.testing.assert_close(layer.residual_forward(tokens), tokens @ layer.residual().T, atol=1e-6, rtol=1e-5)


@needs_bnb
def test_runtime_residual_follows_the_compute_dtype(llama_dir):
    model = get_goat_model(load_quantized(llama_dir, "nf4+dq", compute_dtype=torch.bfloat16), GoatConfig(**CONFIG))
    layer = next(model.goat_layers())
    assert layer.base_layer.compute_dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    assert model(ids()).logits.isfinite().all()


# ---- gradients through a quantized base ----------------------------------------------------------------
def _float_twin(model: GoatModel) -> GoatModel:
    """The same model with every quantized base replaced by an nn.Linear holding its dequantized weight."""
    twin = copy.deepcopy(model)
    for layer in twin.goat_layers():
        base = layer.base_layer
        plain = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(base_weight_2d(base))
            if base.bias is not None:
                plain.bias.copy_(base.bias)
        plain.requires_grad_(False)
        layer.base_layer = plain
    return twin


@needs_bnb
@pytest.mark.parametrize("route", ["goat quantizes nf4", "loaded nf4+dq", "loaded int8"])
def test_gradients_reach_adapters_and_routers_through_the_quantized_base(llama_dir, route):
    """Training mode, the task loss plus the balance loss: every layer's lora_A, lora_B and router get a
    finite, nonzero gradient, equal (1e-4) to that of the same model on float weights deq(W_q): the
    bitsandbytes backward passes the gradient on correctly, not just some gradient."""
    if route.startswith("goat"):
        model = get_goat_model(tiny_llama(hidden=64), GoatConfig(quantize="nf4", **CONFIG))
    else:
        model = get_goat_model(load_quantized(llama_dir, route.split()[1]), GoatConfig(**CONFIG))
    twin = _float_twin(model)
    grads = []
    for m in (model, twin):
        m.train()
        out = m(ids(), labels=ids())
        (out.loss + 1e-3 * m.aux_loss()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and grads[0]
    for name, grad in grads[0].items():
        assert grad is not None and grad.isfinite().all() and grad.abs().sum() > 0, name
        tolerance = dict(atol=1e-4, rtol=1e-3) if "int8" not in route else dict(atol=2e-3, rtol=2e-2)
        torch.testing.assert_close(grad, grads[1][name], **tolerance)
    assert any(".router." in n for n in grads[0]) and any("layers.0.self_attn.q_proj.lora_A" in n for n in grads[0])


# ---- save / load ------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
def test_goat_quantized_adapter_reloads_exactly_onto_a_full_precision_base(kind, tmp_path):
    """No SVD on load: the saved factors rebuild W0 - W_res in float32 with the same operations, so the
    fresh base is quantized to the same codes and the reloaded model's logits are the same bits."""
    base = tiny_llama(hidden=64)
    model = get_goat_model(copy.deepcopy(base), GoatConfig(quantize=kind, **CONFIG))
    with torch.no_grad():
        for layer in model.goat_layers():  # as if trained
            layer.lora_A.add_(0.01 * torch.randn_like(layer.lora_A))
            layer.router.weight.add_(0.1 * torch.randn_like(layer.router.weight))
    model.eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["quantize"] == kind
    import goat_lora.inject as inject

    calls = []
    original = inject.all_initial_factors
    inject.all_initial_factors = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        again = GoatModel.from_pretrained(copy.deepcopy(base), tmp_path)
    finally:
        inject.all_initial_factors = original
    assert not calls  # no SVD
    for (name, a), (_, b) in zip(model.named_goat_layers(), again.named_goat_layers()):
        assert torch.equal(a.base_layer.weight.data, b.base_layer.weight.data), name
    assert torch.equal(again(ids()).logits, model(ids()).logits)


@needs_bnb
@pytest.mark.parametrize("name", list(LOADED))
def test_adapter_on_a_loaded_quantized_base_reloads_exactly(llama_dir, name, tmp_path):
    model = get_goat_model(load_quantized(llama_dir, name), GoatConfig(**CONFIG))
    with torch.no_grad():
        for layer in model.goat_layers():
            layer.lora_B.add_(0.01 * torch.randn_like(layer.lora_B))
    model.eval()
    expected = model(ids()).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["base_quantization"]
    assert set(saved.values()) == {name} and len(saved) == 14
    again = GoatModel.from_pretrained(load_quantized(llama_dir, name), tmp_path)
    assert torch.equal(again(ids()).logits, expected)


@needs_bnb
def test_loading_onto_a_base_quantized_otherwise_is_refused_in_one_line(llama_dir, tmp_path):
    """The base is part of what was trained: another quantization moves it by about its quantization error
    (4-bit: ~9% of |W0|), so every mismatch is refused, naming the layer and both storages."""
    loaded = tmp_path / "loaded-nf4"
    get_goat_model(load_quantized(llama_dir, "nf4+dq"), GoatConfig(**CONFIG)).save_pretrained(loaded)
    own = tmp_path / "goat-nf4"
    get_goat_model(load_full(llama_dir), GoatConfig(quantize="nf4", **CONFIG)).save_pretrained(own)
    plain = tmp_path / "plain"
    get_goat_model(load_full(llama_dir), GoatConfig(**CONFIG)).save_pretrained(plain)
    cases = [
        (
            loaded,
            lambda: load_full(llama_dir),
            r"trained on a bitsandbytes nf4\+dq base layer, but this base's layer is "
            r"a full-precision one; load it onto a base quantized the same way",
        ),
        (
            loaded,
            lambda: load_quantized(llama_dir, "nf4"),
            r"nf4\+dq base layer, but this base's layer is a bitsandbytes nf4 one",
        ),
        (loaded, lambda: load_quantized(llama_dir, "fp4+dq"), r"bitsandbytes fp4\+dq one"),
        (loaded, lambda: load_quantized(llama_dir, "int8"), r"bitsandbytes int8 one"),
        (
            own,
            lambda: load_quantized(llama_dir, "nf4+dq"),
            r"quantizes its base itself \(quantize='nf4'.*load it onto the "
            r"full-precision base model",
        ),
        (
            plain,
            lambda: load_quantized(llama_dir, "nf4+dq"),
            r"trained on a full-precision base layer, but this base's "
            r"layer is a bitsandbytes nf4\+dq one; load it onto a base in full precision",
        ),
    ]
    for folder, make_base, message in cases:
        base = make_base()
        with pytest.raises(ValueError, match=message) as err:
            GoatModel.from_pretrained(base, folder)
        assert "\n" not in str(err.value) and "model.layers.0.self_attn.q_proj" in str(err.value)
        assert not any(isinstance(m, GoatLayer) for m in base.modules())  # refused before changing it


# ---- unload -------------------------------------------------------------------------------------------
@needs_bnb
def test_unload_returns_what_it_says(llama_dir):
    """A loaded quantized base comes back as the very same layers, codes untouched (bit-exact model); a base
    GOAT quantized comes back as its bitsandbytes layers holding Q(W0 - W_res), a quantization of W0 within
    1.05 x QLoRA's error |deq(Q(W0)) - W0|_F (4-bit)."""
    quantized = load_quantized(llama_dir, "nf4+dq")
    expected = quantized(ids()).logits
    layers = {n: m for n, m in quantized.named_modules() if quant.is_quantized_layer(m)}
    model = get_goat_model(quantized, GoatConfig(**CONFIG))
    unloaded = model.unload().eval()
    assert all(unloaded.get_submodule(n) is m for n, m in layers.items())
    assert torch.equal(unloaded(ids()).logits, expected)

    base = load_full(llama_dir)
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if type(m) is nn.Linear}
    model = get_goat_model(base, GoatConfig(quantize="nf4", **CONFIG))
    held = {n: layer.base_layer for n, layer in model.named_goat_layers()}
    unloaded = model.unload()
    for name, layer in held.items():
        assert unloaded.get_submodule(name) is layer and quant.layer_quantization(layer) == "nf4+dq"
        W0 = originals[name]
        qlora = quant.dequantized_weight(quant.quantize_linear(W0, None, quant.QuantSpec("nf4"), torch.float32))
        assert torch.linalg.norm(base_weight_2d(layer) - W0) <= 1.05 * torch.linalg.norm(qlora - W0), name
    assert not any(isinstance(m, GoatLayer) for m in unloaded.modules())


# ---- what is refused ----------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A stand-in for auto-gptq's QuantLinear: packed integer weights, not an nn.Linear."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        self.register_buffer("qweight", torch.zeros(n // 8, m, dtype=torch.int32))
        self.in_features, self.out_features = n, m

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


QuantLinear.__module__ = "auto_gptq.nn_modules.qlinear.qlinear_cuda"


class WQLinear(nn.Linear):
    """A stand-in for AutoAWQ's layer (an nn.Linear subclass elsewhere, e.g. in quanto)."""


WQLinear.__module__ = "awq.modules.linear.gemm"


@needs_bnb
def test_several_adapters_share_a_loaded_quantized_base_and_goat_quantized_bases_are_not_shared(llama_dir):
    """On a base that arrived quantized, switching adapters gives each adapter's own logits and the codes are
    never touched; a base GOAT quantized itself holds one adapter's Q(W0 - W_res), so adding another is refused."""
    quantized = load_quantized(llama_dir, "nf4+dq")
    codes = {n: m.weight.detach().clone() for n, m in quantized.named_modules() if quant.is_quantized_layer(m)}
    model = get_goat_model(quantized, GoatConfig(**CONFIG))
    model.add_adapter("other", GoatConfig(**{**CONFIG, "seed": 1}))
    first = model(ids()).logits
    model.set_adapter("other")
    other = model(ids()).logits
    model.set_adapter("default")
    assert torch.equal(model(ids()).logits, first) and not torch.allclose(first, other)
    unloaded = model.unload()
    for name, weight in codes.items():
        assert torch.equal(unloaded.get_submodule(name).weight, weight)

    goat_quantized = get_goat_model(load_full(llama_dir), GoatConfig(quantize="nf4", **CONFIG))
    with pytest.raises(ValueError, match="quantized the base itself"):
        goat_quantized.add_adapter("other", GoatConfig(**CONFIG))
    with pytest.raises(ValueError, match="cannot quantize the shared base"):
        get_goat_model(load_full(llama_dir), GoatConfig(**CONFIG)).add_adapter(
            "q", GoatConfig(quantize="nf4", **CONFIG)
        )


def test_other_quantized_layers_are_refused_by_name():
    model = TinyMLP()
    model.fc1 = QuantLinear(24, 32)
    with pytest.raises(
        ValueError,
        match=r"target module 'fc1' is a GPTQ \(QuantLinear\) quantized layer, which GOAT "
        r"cannot adapt; supported quantized layers: bitsandbytes Linear4bit",
    ):
        get_goat_model(model, GoatConfig(r=4, num_experts=2))  # "all-linear" sees it too
    with pytest.raises(ValueError, match=r"'fc1' is a GPTQ \(QuantLinear\)"):
        get_goat_model(model, GoatConfig(r=4, num_experts=2, target_modules=["fc1"]))
    model = TinyMLP()
    model.fc2 = WQLinear(32, 16)
    with pytest.raises(ValueError, match=r"target module 'fc2' is a AWQ \(WQLinear\) quantized layer"):
        get_goat_model(model, GoatConfig(r=4, num_experts=2))


def test_config_quantize_is_checked_and_round_trips():
    assert GoatConfig.from_json(GoatConfig(quantize="fp4", double_quant=False).to_json()).quantize == "fp4"
    assert GoatConfig().quantize is None
    with pytest.raises(
        ValueError, match=r"GoatConfig.quantize='nf5' is not allowed; choose one of 'nf4' \| 'fp4' \| 'int8'"
    ):
        GoatConfig(quantize="nf5")
    with pytest.raises(ValueError, match="GoatConfig.double_quant='yes' must be true or false"):
        GoatConfig(double_quant="yes")


def _hide_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError


def test_without_bitsandbytes_quantize_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    from goat_lora.cli import main

    _hide_bitsandbytes(monkeypatch)
    with pytest.raises(ImportError, match=r"install it with: pip install goat-lora\[quant\]"):
        get_goat_model(TinyMLP(), GoatConfig(r=4, num_experts=2, quantize="nf4"))
    for argv in (
        ["train", "--quantize", "nf4", "--output", str(tmp_path / "run")],
        ["compare", "--methods", "goat", "lora", "--quantize", "int8", "--output", str(tmp_path / "cmp")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "needs bitsandbytes: pip install goat-lora[quant]" in err, err
    with pytest.raises(SystemExit, match=r"needs bitsandbytes: pip install goat-lora\[quant\]"):
        main(["bench", "--smoke", "--quantize", "nf4"])
    assert not os.listdir(tmp_path)


@needs_bnb
def test_methods_without_a_quantized_route_are_refused_before_any_run(capsys, tmp_path):
    from goat_lora.cli import main

    argv = [
        "compare",
        "--methods",
        "goat",
        "lora",
        "milora",
        "hydralora",
        "full",
        "head",
        "--quantize",
        "nf4",
        "--output",
        str(tmp_path / "cmp"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and not os.listdir(tmp_path)
    for method in ("'milora'", "'hydralora'", "'full'", "'head'"):
        assert method in err
    assert "methods that run on a quantized base: goat, goat_mini, goat_s, molora, lora, rslora, dora, pissa" in err


# ---- the command line, end to end --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """(model folder, csv): a tiny random BERT with a word tokenizer, and 60 reviews with a label and a score."""
    import csv
    import random

    words = ["good", "bad", "great", "awful", "tasty", "stale", "fresh", "cheap", "love", "hate", "snack", "tea"]
    root = tmp_path_factory.mktemp("quant-text")
    model_dir = save_word_bert(root / "bert", words, hidden=64)
    rng = random.Random(0)
    data = root / "reviews.csv"
    with open(data, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label", "score"])
        for _ in range(60):
            text = [rng.choice(words) for _ in range(6)]
            writer.writerow([" ".join(text), rng.choice(["pos", "neg"]), sum(len(w) for w in text) / 10])
    return str(model_dir), str(data)


TINY = [
    "--train-size",
    "32",
    "--test-size",
    "8",
    "--rank",
    "4",
    "--experts",
    "2",
    "--top-k",
    "1",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--max-length",
    "32",
    "--report-to",
    "none",
]
TINY_RUN = [*TINY, "--save-steps", "0"]


def _run_and_reload(main, tmp_path, argv: list[str], name: str) -> tuple[dict, dict, dict]:
    out = tmp_path / name
    assert main(["train", *argv, *TINY_RUN, "--output", str(out)]) == 0
    assert main(["eval", "--adapter", str(out), "--output", str(out / "ev")]) == 0
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    return read(out / "config.json"), read(out / "metrics.json"), read(out / "ev" / "metrics.json")


@needs_bnb
@pytest.mark.slow
@pytest.mark.parametrize("method", ["goat", "lora", "pissa"])
def test_goat_train_quantize_then_eval_reproduces_the_test_metric(tiny_text, tmp_path, capsys, method):
    """`goat train --quantize nf4` records the kind in config.json; `goat eval` reloads onto a freshly
    quantized base and reproduces every test metric exactly (the loss to the last bit)."""
    from goat_lora.cli import main

    model_dir, data = tiny_text
    config, metrics, again = _run_and_reload(
        main,
        tmp_path,
        ["--method", method, "--data", data, "--model", model_dir, "--quantize", "nf4", "--lr", "1e-2"],
        method,
    )
    label = {"goat": "QGOAT", "lora": "QLoRA", "pissa": "QPiSSA"}[method]
    assert f"| {label} |" in capsys.readouterr().out
    assert config["args"]["quantize"] == "nf4" and metrics["quantize"] == "nf4"
    if method == "goat":
        assert config["goat_config"]["quantize"] == "nf4"
    for key in ("test_accuracy", "test_macro_f1", "test_loss"):
        assert again[key] == metrics[key], key


@needs_bnb
@pytest.mark.slow
def test_every_family_trains_on_a_quantized_base(tiny_text, tmp_path, llama_dir):
    """regression (fp4) and causal-lm (int8) too: trained, recorded, and reproduced by goat eval."""
    from goat_lora.cli import main

    model_dir, data = tiny_text
    config, metrics, again = _run_and_reload(
        main,
        tmp_path,
        ["--task", "regression", "--data", data, "--model", model_dir, "--label-column", "score", "--quantize", "fp4"],
        "regression",
    )
    assert config["args"]["quantize"] == "fp4" and again["test_mse"] == metrics["test_mse"]
    from transformers import AutoTokenizer  # the tiny LLaMA needs a tokenizer: borrow BERT's word-level one

    AutoTokenizer.from_pretrained(model_dir, model_input_names=["input_ids", "attention_mask"]).save_pretrained(
        llama_dir
    )
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"good tea {i} great snack"}) + "\n" for i in range(40)))
    config, metrics, again = _run_and_reload(
        main,
        tmp_path,
        ["--task", "causal-lm", "--data", str(texts), "--model", llama_dir, "--quantize", "int8"],
        "causal",
    )
    assert config["goat_config"]["quantize"] == "int8" and again["test_loss"] == metrics["test_loss"]


@needs_bnb
@pytest.mark.slow
def test_goat_compare_quantize_names_the_q_methods(tiny_text, tmp_path, capsys):
    from goat_lora.cli import main

    model_dir, data = tiny_text
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--methods",
                "goat",
                "lora",
                "dora",
                "pissa",
                "--quantize",
                "nf4",
                "--seeds",
                "1",
                "--lrs",
                "1e-2",
                "--data",
                data,
                "--model",
                model_dir,
                *TINY,
                "--output",
                str(out),
            ]
        )
        == 0
    )
    report = (out / "report.md").read_text()
    for label in ("| QGOAT |", "| QLoRA |", "| QDoRA |", "| QPiSSA |", "quantized nf4 by bitsandbytes"):
        assert label in report, label
    assert json.loads((out / "report.json").read_text())["methods"]["lora"]["label"] == "QLoRA"


@needs_bnb
@pytest.mark.slow
def test_ddp_on_cpu_runs_with_a_quantized_base(tiny_text, tmp_path):
    """torchrun, 2 CPU processes (gloo DDP) x batch 4 = 1 process x batch 8 on an nf4 base GOAT quantized:
    the same per-step losses (1e-5): every process quantizes the same W0 - W_res to the same codes."""
    model_dir, data = tiny_text
    flags = [
        "train",
        "--data",
        data,
        "--model",
        model_dir,
        *TINY_RUN,
        "--quantize",
        "nf4",
        "--dropout",
        "0",
        "--no-shuffle",
        "--logging-steps",
        "1",
        "--lr",
        "1e-2",
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        OMP_WAIT_POLICY="PASSIVE",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.path.join(REPO, "src"),
    )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {}
    for name, launch, batch in (
        ("one", [sys.executable, "-m", "goat_lora.cli"], "8"),
        (
            "two",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(port),
                "-m",
                "goat_lora.cli",
            ],
            "4",
        ),
    ):
        runs[name] = tmp_path / name
        done = subprocess.run(
            [*launch, *flags, "--batch-size", batch, "--output", str(runs[name])],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((runs[n] / "metrics.json").read_text()) for n in ("one", "two"))
    assert two["processes"] == 2 and two["distributed"] == "MULTI_CPU"
    assert [h["loss"] for h in two["train_loss"]] == pytest.approx([h["loss"] for h in one["train_loss"]], abs=1e-5)


@needs_bnb
@pytest.mark.slow
def test_sigkill_then_resume_on_a_quantized_base_matches_the_uninterrupted_run(tiny_text, tmp_path):
    """Checkpoints of a --quantize run (the Trainer saves the bitsandbytes codes and statistics with the
    model) resume after SIGKILL to the uninterrupted run's losses and test metrics."""
    from conftest import run_until_stalled_then_kill

    from goat_lora.cli import main

    model_dir, data = tiny_text
    run = [
        "train",
        "--data",
        data,
        "--model",
        model_dir,
        *TINY,
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--seed",
        "3",
        "--quantize",
        "nf4",
        "--logging-steps",
        "1",
        "--save-steps",
        "4",
        "--lr",
        "1e-2",
    ]
    assert main([*run, "--output", str(tmp_path / "reference")]) == 0
    out, marker = tmp_path / "run", tmp_path / "stalled"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "STALL_AT": "7",
        "STALL_MARKER": str(marker),
        "PYTHONPATH": os.path.join(REPO, "src"),
    }
    run_until_stalled_then_kill([*run, "--output", str(out)], env, marker)
    assert main(["train", "--resume", str(out)]) == 0
    reference, resumed = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("reference", "run"))
    assert resumed["test_loss"] == pytest.approx(reference["test_loss"], abs=1e-6)
    assert [h["loss"] for h in resumed["train_loss"]] == pytest.approx(
        [h["loss"] for h in reference["train_loss"]], abs=1e-6
    )


# ---- goat bench --quantize / --quant-error ---------------------------------------------------------------
@needs_bnb
@pytest.mark.slow
def test_bench_quantize_times_goat_against_qlora(tmp_path, capsys):
    from goat_lora.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--quantize", "nf4", "--no-eval", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["meta"]["quantize"] == "nf4"
    for model in figures["models"].values():
        assert set(model["methods"]) == {"lora", "goat", "goat_runtime"}
        assert {"step", "memory", "runtime_step", "runtime_memory_vs_lora"} <= set(model["ratios"])
    printed = capsys.readouterr().out
    assert "on a nf4 base (lora = QLoRA)" in printed and "target <= 1.05x" in printed


@needs_bnb
@pytest.mark.slow
def test_bench_quant_error_table(tmp_path):
    from goat_lora.cli import main

    out = tmp_path / "error.json"
    assert main(["bench", "--smoke", "--quant-error", "--json", str(out)]) == 0
    tables = json.loads(out.read_text())["quant_error"]["models"]
    for rows in tables.values():
        for row in rows.values():
            assert 0 < row["residual_rel"] < 0.05
            assert 0.05 < row["nf4"]["qlora"] < 0.15 and abs(row["nf4"]["goat_over_qlora"] - 1) < 0.05
            assert row["int8"]["qlora"] < 0.01
