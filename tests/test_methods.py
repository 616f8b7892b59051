"""goat_lora.methods: every method prepares a trainable model; starting points equal the base model where
the method promises it (GOAT's residual, HydraLoRA's zero B, MiLoRA's W - s B A)."""

from __future__ import annotations

import pytest
import torch

from goat_lora.methods import (
    DEFAULT_LR_GRID,
    METHODS,
    count_parameters,
    expert_load,
    goat_config_for,
    method_defaults,
    prepare_model,
)
from goat_lora.methods.hydralora import HydraLoraLayer
from goat_lora.config import GoatConfig
from goat_lora.inject import find_target_modules
from goat_lora.settings import RunSettings
from goat_lora.testing import tiny_bert, token_batch


def spec(method: str = "goat", **knobs) -> RunSettings:
    """Settings as the engine resolves them: the method's defaults (lr, alpha, init, scaling) filled in."""
    settings = RunSettings(method=method, **{"r": 4, "num_experts": 2, "top_k": 1, "dropout": 0.0, **knobs})
    return settings.replace(**{k: v for k, v in method_defaults(settings).items() if getattr(settings, k) is None})


def _targets(model):
    return find_target_modules(model, GoatConfig(target_modules="all-linear", modules_to_save=["classifier"]))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_something_and_runs(method):
    model = tiny_bert()
    base_total = sum(p.numel() for p in model.parameters())
    prepared = prepare_model(method, model, spec(method), _targets(model), ["classifier"])
    trainable, total = count_parameters(prepared)
    assert 0 < trainable <= total
    if method == "full":
        assert trainable == base_total
    if method == "head":
        assert trainable == 32 * 3 + 3
    batch = token_batch()
    out = prepared(**batch, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert all(p.grad is not None for p in prepared.parameters() if p.requires_grad and p.grad is not None)
    assert method in DEFAULT_LR_GRID


@pytest.mark.parametrize("method", ["goat", "goat_mini", "goat_s", "hydralora", "mixlora", "milora", "pissa", "lora"])
def test_starting_model_equals_the_pretrained_one(method):
    """Where the method promises it: the adapted model's first output equals the base model's.
    GOAT needs k = E with a uniform router for exact equality (see GOAT_SPEC)."""
    reference = tiny_bert()
    batch = token_batch()
    with torch.no_grad():
        expected = reference(**batch).logits
    model = tiny_bert()
    prepared = prepare_model(method, model, spec(method, top_k=2), _targets(model), ["classifier"])
    if method.startswith("goat"):
        for layer in prepared.goat_layers():
            torch.nn.init.zeros_(layer.router.weight)
    prepared.eval()
    with torch.no_grad():
        got = prepared(**batch).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_goat_variants_configs():
    assert goat_config_for("goat_mini", spec("goat_mini"), ["x"], []).init == "goat_mini"
    assert goat_config_for("goat_s", spec("goat_s"), ["x"], []).per_expert_scaling is True
    molora = goat_config_for("molora", spec("molora"), ["x"], [])
    assert (molora.init, molora.scaling, molora.lora_alpha) == ("zero", "alpha", 8.0)
    goat = goat_config_for("goat", spec("goat"), ["x"], ["classifier"])
    assert (goat.init, goat.scaling, goat.modules_to_save) == ("goat", "goat", ["classifier"])
    # a knob given explicitly wins over the method's preset
    assert goat_config_for("molora", spec("molora", scaling="goat"), ["x"], []).scaling == "goat"


def test_hydralora_shares_A_and_matches_a_per_expert_loop():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    layer = HydraLoraLayer(
        base, rank=4, num_experts=3, alpha=8.0, dropout=0.0, generator=torch.Generator().manual_seed(0)
    )
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (3, 10, 4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 7, 12)
    probs = torch.softmax(layer.router(x), dim=-1)
    loop = base(x) + layer.scaling * sum(
        probs[..., j : j + 1] * (x @ layer.lora_A.T @ layer.lora_B[j].T) for j in range(3)
    )
    torch.testing.assert_close(layer(x), loop, atol=1e-5, rtol=1e-5)
    load = list(expert_load(torch.nn.Sequential(layer)).values())[0]
    assert abs(sum(load) - 1.0) < 1e-9


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        prepare_model("nope", tiny_bert(), spec(), [], [])


class _PointwiseConvNet(torch.nn.Module):
    """The image model's adapted layers in small: 1x1 convolutions, then a Linear head."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.expand = torch.nn.Conv2d(6, 12, 1)
        self.project = torch.nn.Conv2d(12, 8, 1)
        self.classifier = torch.nn.Linear(8, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, pixel_values):
        hidden = self.project(torch.relu(self.expand(pixel_values)))
        return self.classifier(hidden.mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_svd_initialised_baselines_start_at_the_pretrained_convolution_net(method):
    """peft's PiSSA refuses convolutions ("Unknown initialization"): on 1x1 convs PiSSA is initialised
    here by peft's formula. Each LoRA holds the r largest (PiSSA) or smallest (MiLoRA) components of W,
    and W - s B A + s B A = W: the starting model is the pretrained one."""
    from peft.tuners.lora import LoraLayer

    model, reference = _PointwiseConvNet(), _PointwiseConvNet()
    pixels = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    prepared = prepare_model(method, model, spec(method, r=2), ["expand", "project"], ["classifier"])
    prepared.eval()
    with torch.no_grad():
        torch.testing.assert_close(prepared(pixel_values=pixels), reference(pixel_values=pixels), atol=1e-5, rtol=1e-5)
    layers = [m for m in prepared.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 2
    for layer in layers:
        original = getattr(reference, "expand" if layer.get_base_layer().in_channels == 6 else "project").weight
        S = torch.linalg.svdvals(original.view(original.shape[0], -1).double())
        product = (
            layer.lora_B["default"].weight.flatten(1).double() @ layer.lora_A["default"].weight.flatten(1).double()
        )
        kept = S[:2] if method == "pissa" else S[-2:]  # s B A is W's best rank-2 part (PiSSA) or its smallest
        torch.testing.assert_close(
            torch.linalg.svdvals(layer.scaling["default"] * product)[:2], kept, atol=1e-5, rtol=1e-5
        )


def test_pissa_here_is_peft_pissa_on_linear_layers():
    """The formula used on convolutions (`svd_lora_init(..., "principal")`) gives what peft's own PiSSA
    gives on Linear layers: the same s B A and the same residual base weights."""
    import peft

    from goat_lora.methods.peft_methods import svd_lora_init

    targets = _targets(tiny_bert())
    config = dict(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"])
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(init_lora_weights="pissa", **config))
    ours = peft.get_peft_model(tiny_bert(), peft.LoraConfig(init_lora_weights=True, **config))
    svd_lora_init(ours, "principal")
    for name in targets:
        a, b = ours.base_model.model.get_submodule(name), theirs.base_model.model.get_submodule(name)
        delta_a = a.lora_B["default"].weight @ a.lora_A["default"].weight
        delta_b = b.lora_B["default"].weight @ b.lora_A["default"].weight
        torch.testing.assert_close(delta_a, delta_b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.get_base_layer().weight, b.get_base_layer().weight, atol=1e-5, rtol=1e-4)
