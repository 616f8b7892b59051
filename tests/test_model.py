"""get_goat_model / GoatModel on a table of (model, config) cases through shared checkers, PEFT style
(the public API); alignment with the pretrained model on MiniLM,
a tiny LLaMA and a tiny GPT-2 (acceptance 3).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import MODEL_CASES, model_output
from torch import nn
from transformers.pytorch_utils import Conv1D

from goat_lora import GoatConfig, GoatLayer, GoatModel, get_goat_model
from goat_lora.layer import base_weight_2d
from goat_lora.testing import tiny_convnet, tiny_gpt2, tiny_llama, tiny_mlp, token_batch

CASE_IDS = list(MODEL_CASES)


def build(case_id: str, **overrides):
    factory, kwargs, inputs, n_layers = MODEL_CASES[case_id]
    base = factory()
    original = copy.deepcopy(base)
    config = GoatConfig(**{"dropout": 0.0, **kwargs, **overrides})
    return original, get_goat_model(base, config), inputs(), n_layers


def zero_routers(model: GoatModel) -> None:
    with torch.no_grad():
        for layer in model.goat_layers():
            layer.router.weight.zero_()


# ---- shared checkers ----------------------------------------------------------------------------


def check_adapted_layers(original, model, n_layers):
    layers = dict(model.named_goat_layers())
    assert len(layers) == n_layers
    for name, layer in layers.items():
        assert isinstance(layer, GoatLayer)
        assert isinstance(layer.base_layer, (nn.Linear, Conv1D, nn.Conv2d))
        assert type(layer.base_layer) is type(original.get_submodule(name))
    # "all-linear" never adapts the output head or a top-level classifier / score head
    get_output = getattr(original, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    head_names = {n for n, m in original.named_modules() if m is head} | {"classifier", "score"}
    assert not head_names & set(layers)


def check_trainable(model, inputs):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = set()
    for name, _ in model.named_goat_layers():
        expected |= {f"base_model.{name}.lora_A", f"base_model.{name}.lora_B", f"base_model.{name}.router.weight"}
    for name in model.modules_to_save:
        expected |= {f"base_model.{name}.{k}" for k, _ in model.base_model.get_submodule(name).named_parameters()}
    assert trainable == expected
    model.train()
    out = model_output(model, inputs)
    loss = out.float().pow(2).mean() + model.goat_config.aux_loss_coef * model.aux_loss()
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
    routers = [layer.router.weight.grad for layer in model.goat_layers() if layer.router.weight.shape[0] > 1]
    assert any(float(g.abs().sum()) > 0 for g in routers), "no router learns"
    model.eval()


def exact_alignment_overrides(kwargs: dict) -> dict:
    """The routing settings under which a zero router gives every expert exactly E[w_j] (so the adapted
    model is the pretrained one exactly): top_k with k = E, top_p with p = 1, shared with k = E - 1."""
    num_experts, routing = kwargs.get("num_experts", 8), kwargs.get("routing", "top_k")
    if routing == "shared":
        return dict(top_k=num_experts - 1)
    if routing == "top_p":
        return dict(top_p=1.0)
    return dict(top_k=num_experts)


def check_alignment(original, model, inputs, atol=1e-4):
    """Zero routers under exact_alignment_overrides: every expert weighs E[w_j], so
    sum_j E[w_j] s B_j A_j = W_res and the output is W0 x."""
    zero_routers(model)
    with torch.no_grad():
        expected = model_output(original, inputs)
        actual = model_output(model, inputs)
    diff = float((actual.float() - expected.float()).abs().max())
    assert diff <= atol, f"max abs diff {diff:.2e}"
    return diff


def check_unload(original, model, inputs):
    base = model.unload()
    assert not any(isinstance(m, GoatLayer) for m in base.modules())
    assert [n for n, _ in base.named_parameters()] == [n for n, _ in original.named_parameters()]
    for (name, p), (_, q) in zip(base.named_parameters(), original.named_parameters()):
        assert p.requires_grad == q.requires_grad, name
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model_output(base, inputs), model_output(original, inputs), atol=1e-5, rtol=1e-5)


# ---- the table through the checkers ---------------------------------------------------------------


@pytest.mark.parametrize("case", CASE_IDS)
def test_adapted_layers(case):
    original, model, _, n_layers = build(case)
    check_adapted_layers(original, model, n_layers)


@pytest.mark.parametrize("case", CASE_IDS)
def test_trainable_parameters_and_gradients(case):
    _, model, inputs, _ = build(case)
    check_trainable(model, inputs)


@pytest.mark.parametrize("case", CASE_IDS)
def test_alignment_with_pretrained_model(case):
    _, kwargs, _, _ = MODEL_CASES[case]
    original, model, inputs, _ = build(case, **exact_alignment_overrides(kwargs))
    check_alignment(original, model, inputs)


@pytest.mark.parametrize("case", CASE_IDS)
def test_unload_restores_the_base_model(case):
    original, model, inputs, _ = build(case)
    model.train()
    out = model_output(model, inputs)
    out.float().pow(2).mean().backward()
    with torch.no_grad():  # a training step: unload must still give the originals back
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    model.eval()
    check_unload(original, model, inputs)


@pytest.mark.parametrize("case", ["llama-all-linear-defaults", "llama-top-p", "gpt2-conv1d-shared-top1"])
def test_adapted_model_differs_once_routing_is_not_uniform(case):
    """The alignment checker is not vacuous: with top_k < E (top_p < 1, shared top_k < E - 1) the adapted
    model is not the base, with its random routers and with zero ones."""
    original, model, inputs, _ = build(case)
    with torch.no_grad():
        diff = float((model_output(model, inputs) - model_output(original, inputs)).abs().max())
    assert diff > 1e-3
    zero_routers(model)
    with torch.no_grad():
        diff = float((model_output(model, inputs) - model_output(original, inputs)).abs().max())
    assert diff > 1e-3


# ---- alignment on the three models named by the issue --------------------------------------------


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("init", ["goat", "goat_mini", "principal", "minor", "random"])
def test_alignment_tiny_decoders(factory, init):
    base = factory()
    original = copy.deepcopy(base)
    model = get_goat_model(base, GoatConfig(r=8, num_experts=8, top_k=8, init=init, dropout=0.0))
    check_alignment(original, model, token_batch())


@pytest.mark.parametrize("routing", ["top_k", "top_p", "shared"])
def test_alignment_minilm(minilm, minilm_batch, routing):
    original = copy.deepcopy(minilm)
    settings = exact_alignment_overrides(dict(num_experts=8, routing=routing))
    model = get_goat_model(minilm, GoatConfig(r=8, num_experts=8, routing=routing, dropout=0.0, **settings))
    assert len(model.goat_layer_names) == 37  # 6 x 6 in the encoder + the pooler; the fresh classifier skipped
    assert "classifier" not in model.goat_layer_names
    check_alignment(original, model, minilm_batch)


def test_minilm_unload_bf16_within_rounding(minilm, minilm_batch):
    """unload() on a bfloat16 MiniLM: each weight within two bf16 roundings of the original."""
    base = minilm.to(torch.bfloat16)
    originals = {
        n: base_weight_2d(m).detach().float().clone() for n, m in base.named_modules() if isinstance(m, nn.Linear)
    }
    model = get_goat_model(base, GoatConfig(r=8, num_experts=4, dropout=0.0))
    residuals = {n: layer.residual() for n, layer in model.named_goat_layers()}
    with torch.no_grad():
        logits = model(**minilm_batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    unloaded = model.unload()
    unit = 2.0**-8
    for name, module in unloaded.named_modules():
        if name in residuals:
            W0, R = originals[name], residuals[name]
            bound = 1.01 * unit * ((W0 - R).abs() + W0.abs()) + 1e-12
            assert torch.all((base_weight_2d(module).float() - W0).abs() <= bound), name
        elif name in originals:
            assert torch.equal(base_weight_2d(module).float(), originals[name]), name


# ---- targets: types, all-linear rules, errors -----------------------------------------------------


def test_conv2d_1x1_is_adapted_and_3x3_is_refused():
    model = get_goat_model(tiny_convnet(), GoatConfig(r=4, num_experts=2, target_modules=["pw1", "pw2"]))
    assert model.goat_layer_names == ["pw1", "pw2"]
    with pytest.raises(
        ValueError, match=r"target module 'dw' is a Conv2d, which GOAT cannot adapt; supported: nn.Linear"
    ):
        get_goat_model(tiny_convnet(), GoatConfig(r=4, num_experts=2, target_modules=["pw1", "dw"]))


@pytest.mark.parametrize(
    "target, kind",
    [(["embed_tokens"], "Embedding"), (["input_layernorm"], "LlamaRMSNorm"), (["self_attn"], "LlamaAttention")],
)
def test_other_target_types_are_refused(target, kind):
    with pytest.raises(ValueError, match=rf"is a {kind}, which GOAT cannot adapt"):
        get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=8, target_modules=target))


def test_all_linear_skips_the_lm_head_and_includes_conv1d():
    gpt2 = get_goat_model(tiny_gpt2(), GoatConfig(r=4, num_experts=4))
    assert "lm_head" not in gpt2.goat_layer_names
    assert all(isinstance(layer.base_layer, Conv1D) for layer in gpt2.goat_layers())
    llama = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=8))
    assert "lm_head" not in llama.goat_layer_names
    assert sorted({n.rsplit(".", 1)[-1] for n in llama.goat_layer_names}) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


def test_all_linear_adapts_every_linear_of_a_plain_module():
    """Without get_output_embeddings there is no head to detect: every Linear is adapted (as in peft)."""
    model = get_goat_model(tiny_mlp(), GoatConfig(r=4, num_experts=2))
    assert model.goat_layer_names == ["fc1", "fc2"]


def test_lm_head_can_be_targeted_explicitly():
    model = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=8, target_modules=["lm_head"]))
    assert model.goat_layer_names == ["lm_head"]


def test_no_match_is_an_error_listing_adaptable_modules():
    with pytest.raises(
        ValueError,
        match=r"target_modules=\['query'\] matched no adaptable module of LlamaForCausalLM; adaptable modules include",
    ):
        get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=8, target_modules=["query"]))


def test_modules_to_save_that_match_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"modules_to_save=\['classifier'\] matched no module"):
        get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=8, modules_to_save=["classifier"]))


def test_layer_segment_too_short_names_the_layer():
    with pytest.raises(ValueError, match=r"layer 'fc2' \(out=4, in=32\): rank per expert d=2 .* segment t=.*4//4=1"):
        get_goat_model(tiny_mlp(sizes=(24, 32, 4)), GoatConfig(r=8, num_experts=4))


def test_adapting_twice_is_refused():
    model = get_goat_model(tiny_mlp(), GoatConfig(r=4, num_experts=2))
    with pytest.raises(ValueError, match="already a GoatModel"):
        get_goat_model(model, GoatConfig(r=4, num_experts=2))
    with pytest.raises(ValueError, match="already a GoatLayer"):
        get_goat_model(model.base_model, GoatConfig(r=4, num_experts=2))


def test_config_must_be_a_goat_config():
    with pytest.raises(ValueError, match="config must be a GoatConfig"):
        get_goat_model(tiny_mlp(), {"r": 4})


# ---- a transformers model keeps its API ----------------------------------------------------------


def test_forward_passes_labels_and_generate_works():
    original = tiny_llama()
    model = get_goat_model(copy.deepcopy(original), GoatConfig(r=8, num_experts=4, top_k=4, dropout=0.0))
    zero_routers(model)
    batch = token_batch(batch=1, length=6)
    out = model(**batch, labels=batch["input_ids"])
    assert out.loss is not None and out.loss.ndim == 0
    torch.testing.assert_close(out.loss, original(**batch, labels=batch["input_ids"]).loss, atol=1e-5, rtol=1e-5)
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = original.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 10) and torch.equal(generated, expected)


def test_forward_signature_and_attribute_forwarding_for_the_trainer():
    model = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=8))
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels"} <= set(params)
    assert model.config is model.base_model.config  # __getattr__ forwarding
    assert model.device == torch.device("cpu")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.base_model.model.gradient_checkpointing
    with pytest.raises(AttributeError):
        _ = model.no_such_attribute


def test_aux_loss_is_the_sum_over_layers_and_ignores_padding_when_asked():
    for ignore in (False, True):
        model = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=4, aux_loss_ignore_padding=ignore))
        batch = token_batch()
        model(**batch)
        per_layer = [layer.aux_loss() for layer in model.goat_layers()]
        torch.testing.assert_close(model.aux_loss(), torch.stack(per_layer).sum())
        tokens = {float(layer.last_stats.num_tokens) for layer in model.goat_layers()}
        assert tokens == ({float(batch["attention_mask"].sum())} if ignore else {float(batch["input_ids"].numel())})
        assert all(layer.token_mask is None for layer in model.goat_layers()), "mask left behind"


def test_expert_load_and_reset():
    model = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=4))
    model(**token_batch())
    load = model.expert_load()
    assert set(load) == set(model.goat_layer_names)
    for fractions in load.values():
        assert fractions.shape == (4,) and float(fractions.sum()) == pytest.approx(1.0)
    model.reset_expert_load()
    assert all(float(f.sum()) == 0 for f in model.expert_load().values())


def test_print_trainable_parameters(capsys):
    model = get_goat_model(tiny_mlp(), GoatConfig(r=4, num_experts=2))
    model.print_trainable_parameters()
    # fc1: A 4x24 + B 32x4 + router 2x24; fc2: A 4x32 + B 16x4 + router 2x32
    trainable = (96 + 128 + 48) + (128 + 64 + 64)
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out
    assert model.count_parameters()[0] == trainable


def test_gradient_checkpointing_records_routing_once():
    model = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=4, dropout=0.0))
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = token_batch()
    out = model(**batch, labels=batch["input_ids"])
    (out.loss + model.aux_loss()).backward()
    layer = next(model.goat_layers())
    assert float(layer.load_counts.sum()) == batch["input_ids"].numel() * 2  # one forward's k=2 slots
    assert layer.router.weight.grad is not None


def test_all_linear_skips_top_level_classifier_and_score_heads_only():
    from goat_lora.testing import tiny_gpt2_classifier

    gpt2 = get_goat_model(tiny_gpt2_classifier(), GoatConfig(r=4, num_experts=2))  # no modules_to_save
    assert "score" not in gpt2.goat_layer_names and len(gpt2.goat_layer_names) == 8

    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.ModuleDict({"classifier": nn.Linear(8, 8), "score": nn.Linear(8, 8)})
            self.classifier = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))  # a RoBERTa-style head

    model = get_goat_model(Nested(), GoatConfig(r=2, num_experts=2))
    assert model.goat_layer_names == ["body.classifier", "body.score"]


# ---- routing variants at the model level ----------------------------------------------


@pytest.mark.parametrize(
    "routing, top_k, top_p, expected",
    [("top_k", 2, 0.25, 2.0), ("shared", 3, 0.25, 3.0), ("top_p", 2, 0.3, 3.0), ("top_p", 2, 0.25, 2.0)],
)
def test_aux_loss_of_zero_routers_is_pinned_for_each_variant(routing, top_k, top_p, expected):
    """Zero routers make every layer's probabilities uniform: the public form is the number of routed
    experts a token uses per layer (top_k, shared: k; top_p of E = 8: ceil(8 p)), summed over the 14
    layers; the paper form is 1 per layer."""
    for form, per_layer in (("public", expected), ("paper", 1.0)):
        model = get_goat_model(
            tiny_llama(), GoatConfig(r=8, num_experts=8, top_k=top_k, routing=routing, top_p=top_p, aux_loss_form=form)
        )
        zero_routers(model)
        model(**token_batch())
        assert float(model.aux_loss().detach()) == pytest.approx(14 * per_layer)


def test_expert_load_counts_the_shared_expert_and_the_plot_shows_it(tmp_path, monkeypatch):
    """shared, top-2 of the other 3: every token uses expert 0, so it has 1/3 of all uses in every layer,
    and expert_load.png gets a column for it (E columns, expert 0 the brightest)."""
    from goat_lora import report

    model = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=4, top_k=2, routing="shared"))
    batch = token_batch()
    model(**batch)
    load = model.expert_load()
    for name, fractions in load.items():
        assert fractions.shape == (4,) and float(fractions.sum()) == pytest.approx(1.0)
        assert float(fractions[0]) == pytest.approx(1 / 3), name
        assert float(fractions[1:].sum()) == pytest.approx(2 / 3)  # the routed experts share the k = 2 other uses
    shown = []
    real_imshow = report.plt.Axes.imshow
    monkeypatch.setattr(
        report.plt.Axes, "imshow", lambda ax, rows, **kw: shown.append(rows) or real_imshow(ax, rows, **kw)
    )
    path = tmp_path / "expert_load.png"
    report.plot_expert_load({n: [float(v) for v in f] for n, f in load.items()}, str(path))
    assert path.stat().st_size > 0
    (rows,) = shown
    assert len(rows) == 14 and all(len(row) == 4 and row[0] == pytest.approx(1 / 3) for row in rows)


@pytest.mark.parametrize("routing", ["top_p", "shared"])
def test_trainable_parameters_of_each_variant(routing):
    """The routers have R outputs (E - 1 with a shared expert) and all of them learn."""
    model = get_goat_model(tiny_mlp(), GoatConfig(r=8, num_experts=4, top_k=2, routing=routing, dropout=0.0))
    for layer in model.goat_layers():
        assert layer.router.weight.shape[0] == (3 if routing == "shared" else 4)
    check_trainable(model, {"x": torch.randn(3, 4, 24, generator=torch.Generator().manual_seed(1))})


# ---- inference without bookkeeping ----------------------------------------------------------------
def _count_ops(fn) -> int:
    """Compute ops (views and detaches left out) that `fn` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func is not torch.ops.aten.detach.default:
                Count.count += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.count


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_records_nothing_unless_asked(mode):
    """Without autograd a GOAT layer routes and does its two matmuls only: no routing statistics, no
    expert-load counts (eval, generation, lm-eval, serving). recording_routing() asks for them, and
    then they equal what a forward with autograd records; outputs are the same either way (to rounding: without
    recording the kept experts' weights are a softmax over their logits, functional.routed_experts_inference)."""
    torch.manual_seed(0)
    model = get_goat_model(tiny_mlp(), GoatConfig(r=8, num_experts=4, top_k=2, target_modules="all-linear"))
    model.eval()
    x = torch.randn(16, 24)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        plain = model(x)
    assert all(layer.last_stats is None for layer in model.goat_layers())
    assert all(float(layer.load_counts.sum()) == 0 for layer in model.goat_layers())
    assert float(model.aux_loss()) == 0.0
    with context(), model.recording_routing():
        recorded = model(x)
    assert not any(layer.record_inference for layer in model.goat_layers())  # restored on exit
    counts = {name: layer.load_counts.clone() for name, layer in model.named_goat_layers()}
    with torch.no_grad():  # statistics recorded without autograd carry no gradient
        aux_recorded = float(model.aux_loss())
    model.reset_expert_load()
    with torch.enable_grad():
        with_grad = model(x)
    torch.testing.assert_close(plain, recorded)
    assert torch.equal(recorded, with_grad.detach())
    assert aux_recorded == pytest.approx(float(model.aux_loss().detach()))
    for name, layer in model.named_goat_layers():
        assert torch.equal(counts[name], layer.load_counts) and float(counts[name].sum()) == 16 * 2


def test_inference_costs_fewer_ops_than_recorded_inference():
    torch.manual_seed(0)
    model = get_goat_model(tiny_mlp(), GoatConfig(r=8, num_experts=4, top_k=2, target_modules="all-linear")).eval()
    x = torch.randn(16, 24)
    with torch.inference_mode():
        plain = _count_ops(lambda: model(x))
        with model.recording_routing():
            recorded = _count_ops(lambda: model(x))
    layers = len(list(model.goat_layers()))
    assert recorded - plain >= 4 * layers  # statistics (sums), the load update and its casts, per layer
