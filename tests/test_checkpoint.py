"""save_pretrained / from_pretrained in PEFT's layout: exact logits after a
reload with no SVD, and a clear error for every way the files or the base model can be wrong."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from conftest import MODEL_CASES, model_output

import goat_lora.inject
import goat_lora.svd
from goat_lora import GoatConfig, GoatModel, get_goat_model
from goat_lora.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from goat_lora.testing import tiny_gpt2, tiny_llama


def trained_model(case_id: str, dtype=torch.float32):
    """An adapted model after one SGD step (so saved weights differ from their init)."""
    factory, kwargs, inputs_fn, _ = MODEL_CASES[case_id]
    model = get_goat_model(factory().to(dtype), GoatConfig(**{"dropout": 0.0, **kwargs}))
    inputs = inputs_fn()
    model.train()
    model_output(model, inputs).float().pow(2).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.5 * p.grad.sign() * 1e-2)
                p.grad = None
    model.eval()
    return model, factory, inputs


def forbid_svd(monkeypatch) -> None:
    """From here on, any SVD or eigendecomposition, and every function of goat_lora.svd (also where
    inject imported it), raises."""
    import inspect

    def boom(*args, **kwargs):
        raise AssertionError("an SVD ran while loading an adapter")

    for owner, name in [
        (torch.linalg, "svd"),
        (torch.linalg, "svdvals"),
        (torch.linalg, "eigh"),
        (torch.linalg, "eig"),
        (torch, "svd"),
        (torch, "svd_lowrank"),
        (torch, "pca_lowrank"),
    ]:
        monkeypatch.setattr(owner, name, boom)
    for name, fn in inspect.getmembers(goat_lora.svd, inspect.isfunction):
        if fn.__module__ == goat_lora.svd.__name__:
            monkeypatch.setattr(goat_lora.svd, name, boom)
            if hasattr(goat_lora.inject, name):
                monkeypatch.setattr(goat_lora.inject, name, boom)
    for name in ("initial_factors", "all_initial_factors"):
        if hasattr(goat_lora.inject, name):
            monkeypatch.setattr(goat_lora.inject, name, boom)


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_round_trip_reproduces_logits_exactly_without_svd(case, tmp_path, monkeypatch):
    model, factory, inputs = trained_model(case)
    with torch.no_grad():
        expected = model_output(model, inputs)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    base = factory()
    forbid_svd(monkeypatch)
    loaded = GoatModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        actual = model_output(loaded, inputs)
    assert torch.equal(actual, expected)
    assert loaded.goat_config == model.goat_config
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_round_trip_bf16_base(tmp_path, monkeypatch):
    model, factory, inputs = trained_model("llama-all-linear-defaults", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    base = factory().to(torch.bfloat16)
    forbid_svd(monkeypatch)
    loaded = GoatModel.from_pretrained(base, tmp_path)
    assert next(loaded.goat_layers()).lora_A.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


def test_file_contents_follow_peft_layout(tmp_path):
    model, _, _ = trained_model("bert-cls-modules_to_save")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "GOAT" and config["r"] == 8 and config["modules_to_save"] == ["classifier"]
    assert config["layers"]["bert.pooler.dense"] == [32, 32]
    tensors = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    name = "bert.encoder.layer.0.attention.self.query"
    layer = dict(model.named_goat_layers())[name]
    for key in ("lora_A", "lora_B", "router.weight", "init_A", "init_B", "expert_scale"):
        assert torch.equal(tensors[f"{name}.{key}"], layer.state_dict()[key]), key
    assert f"{name}.base_fingerprint" in tensors
    assert "classifier.weight" in tensors and "classifier.bias" in tensors
    assert not any("base_layer" in key for key in tensors), "the frozen base weights must not be saved"
    assert not any(key.startswith("bert.embeddings") for key in tensors)


def test_loaded_model_can_be_trained_further(tmp_path):
    model, factory, inputs = trained_model("bert-cls-modules_to_save")
    model.save_pretrained(tmp_path)
    loaded = GoatModel.from_pretrained(factory(), tmp_path, is_trainable=True)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    loaded.train()
    model_output(loaded, inputs).pow(2).mean().backward()
    assert all(p.grad is not None for n, p in loaded.named_parameters() if p.requires_grad)


def test_unload_after_load_gives_the_original_weights(tmp_path):
    model, factory, _ = trained_model("gpt2-conv1d-principal")
    model.save_pretrained(tmp_path)
    base = GoatModel.from_pretrained(factory(), tmp_path).unload()
    original = factory()
    for (name, p), (_, q) in zip(base.named_parameters(), original.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=name)


# ---- errors -------------------------------------------------------------------------------------


@pytest.fixture
def saved_llama(tmp_path):
    model, _, _ = trained_model("llama-all-linear-defaults")
    model.save_pretrained(tmp_path)
    return tmp_path


def test_other_shapes_are_refused(saved_llama):
    with pytest.raises(
        ValueError, match=r"was saved for shape \(out=32, in=32\), but this base model's layer has \(out=48, in=48\)"
    ):
        GoatModel.from_pretrained(tiny_llama(hidden=48), saved_llama)


def test_other_weights_are_refused(saved_llama):
    with pytest.raises(
        ValueError, match=r"trained on other base weights than this model's \(weight fingerprint differs\)"
    ):
        GoatModel.from_pretrained(tiny_llama(seed=1), saved_llama)


def test_slightly_perturbed_weights_are_refused(saved_llama):
    base = tiny_llama()
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight.mul_(1.1)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj' was trained on other base weights"):
        GoatModel.from_pretrained(base, saved_llama)


def test_other_architecture_is_refused(saved_llama):
    with pytest.raises(ValueError, match="does not fit this base model"):
        GoatModel.from_pretrained(tiny_gpt2(), saved_llama)


def test_unknown_config_field_is_refused(saved_llama):
    path = saved_llama / CONFIG_NAME
    path.write_text(json.dumps(json.loads(path.read_text()) | {"use_dora": True}))
    with pytest.raises(ValueError, match=r"unknown GoatConfig field\(s\) \['use_dora'\]"):
        GoatModel.from_pretrained(tiny_llama(), saved_llama)


@pytest.mark.parametrize("field, value", [("num_experts", 4), ("r", 16)])
def test_config_that_disagrees_with_the_weights_is_refused(saved_llama, field, value):
    path = saved_llama / CONFIG_NAME
    path.write_text(json.dumps(json.loads(path.read_text()) | {field: value, "top_k": 2}))
    with pytest.raises(ValueError, match=rf"adapter_config.json says {field}={value}"):
        GoatModel.from_pretrained(tiny_llama(), saved_llama)


@pytest.mark.parametrize("missing", [WEIGHTS_NAME, CONFIG_NAME])
def test_missing_file(saved_llama, missing):
    (saved_llama / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"adapter file .*{missing}.* is missing"):
        GoatModel.from_pretrained(tiny_llama(), saved_llama)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GoatModel.from_pretrained(tiny_llama(), tmp_path / "nope")


def _without_checksum(folder) -> None:
    """Drop weights_sha256 from adapter_config.json: an adapter saved before the checksum existed, or one
    whose weights a user rewrote on purpose; the checks below the checksum must still hold for it."""
    config_path = folder / CONFIG_NAME
    data = json.loads(config_path.read_text())
    del data["weights_sha256"]
    config_path.write_text(json.dumps(data))


def _damage(path, damage: str) -> None:
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":
        path.write_bytes(b"\xff" * 8 + data[8:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # one bit flipped deep inside the tensor data: still a valid safetensors file
        flipped = bytearray(data)
        flipped[len(data) - 100] ^= 0x01
        path.write_bytes(bytes(flipped))


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "empty", "bit-flip"])
def test_changed_weights_are_refused_by_the_checksum(saved_llama, damage):
    config = json.loads((saved_llama / CONFIG_NAME).read_text())
    assert len(config["weights_sha256"]) == 64
    _damage(saved_llama / WEIGHTS_NAME, damage)
    with pytest.raises(ValueError, match="do not match the weights_sha256 of adapter_config.json"):
        GoatModel.from_pretrained(tiny_llama(), saved_llama)


def test_bit_flip_without_the_checksum_would_load_silently(saved_llama):
    """Why the checksum exists: a flipped bit in tensor data leaves a valid file that loads."""
    _without_checksum(saved_llama)
    _damage(saved_llama / WEIGHTS_NAME, "bit-flip")
    GoatModel.from_pretrained(tiny_llama(), saved_llama)


def test_adapter_without_checksum_loads_and_matches(saved_llama):
    reference = GoatModel.from_pretrained(tiny_llama(), saved_llama)
    _without_checksum(saved_llama)
    legacy = GoatModel.from_pretrained(tiny_llama(), saved_llama)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            model_output(legacy, {"input_ids": ids}), model_output(reference, {"input_ids": ids}), rtol=0, atol=0
        )


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "empty"])
def test_damaged_safetensors(saved_llama, damage):
    _without_checksum(saved_llama)
    _damage(saved_llama / WEIGHTS_NAME, damage)
    with pytest.raises(ValueError, match="unreadable \\(truncated or corrupt\\)"):
        GoatModel.from_pretrained(tiny_llama(), saved_llama)


def test_incomplete_safetensors(saved_llama):
    _without_checksum(saved_llama)
    path = saved_llama / WEIGHTS_NAME
    tensors = safetensors.torch.load_file(path)
    del tensors["model.layers.0.self_attn.q_proj.init_B"]
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(ValueError, match=r"lack model.layers.0.self_attn.q_proj.init_B"):
        GoatModel.from_pretrained(tiny_llama(), saved_llama)


def test_saved_tensor_of_wrong_shape_is_refused(saved_llama):
    _without_checksum(saved_llama)
    path = saved_llama / WEIGHTS_NAME
    tensors = safetensors.torch.load_file(path)
    tensors["model.layers.0.self_attn.q_proj.lora_B"] = torch.zeros(32, 7)
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(ValueError, match=r"q_proj.lora_B has shape \(32, 7\), expected \(32, 8\)"):
        GoatModel.from_pretrained(tiny_llama(), saved_llama)


def test_failed_load_leaves_the_base_model_untouched(saved_llama):
    base = tiny_llama(seed=1)
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError):
        GoatModel.from_pretrained(base, saved_llama)
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_save_is_atomic_and_overwrites(tmp_path):
    model, factory, inputs = trained_model("mlp-minor-goat-s")
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        next(model.goat_layers()).lora_B.add_(1.0)
        expected = model_output(model, inputs)
    model.save_pretrained(tmp_path)  # second save replaces the first
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME], "temporary files left behind"
    with torch.no_grad():
        assert torch.equal(model_output(GoatModel.from_pretrained(factory(), tmp_path), inputs), expected)


def test_modules_to_save_of_another_shape_are_refused_before_touching_the_base(tmp_path):
    from goat_lora.testing import tiny_bert

    model, _, _ = trained_model("bert-cls-modules_to_save")  # classifier: 3 labels
    model.save_pretrained(tmp_path)
    base = tiny_bert()
    base.classifier = torch.nn.Linear(32, 5)  # same body, another head
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(
        ValueError, match=r"saved module 'classifier' does not fit this base model: (weight|bias) has shape \(3"
    ):
        GoatModel.from_pretrained(base, tmp_path)
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---- routing modes: saved with the adapter, older adapters load as top-k -----------------


@pytest.mark.parametrize("case", ["llama-top-p", "bert-shared-expert"])
def test_routing_mode_is_saved_and_reloaded(case, tmp_path):
    model, factory, inputs = trained_model(case)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    config = model.goat_config
    assert (saved["routing"], saved["top_p"]) == (config.routing, config.top_p)
    tensors = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    name, layer = next(iter(model.named_goat_layers()))
    assert tensors[f"{name}.router.weight"].shape[0] == config.num_routed_experts  # E - 1 with a shared expert
    loaded = GoatModel.from_pretrained(factory(), tmp_path)
    for loaded_layer in loaded.goat_layers():
        assert (loaded_layer.routing, loaded_layer.top_p, loaded_layer.top_k) == (
            config.routing,
            config.top_p,
            config.top_k,
        )
        assert loaded_layer.residual_coefs == layer.residual_coefs
    with torch.no_grad():
        assert torch.equal(model_output(loaded, inputs), model_output(model, inputs))


def test_adapter_config_without_routing_fields_loads_as_top_k(saved_llama):
    """An adapter saved before the routing fields existed has neither `routing` nor `top_p`: it loads as
    top-k, with the logits it gave when saved (the weights checksum is untouched: it covers the tensors)."""
    reference = GoatModel.from_pretrained(tiny_llama(), saved_llama)
    path = saved_llama / CONFIG_NAME
    data = json.loads(path.read_text())
    assert data.pop("routing") == "top_k" and "top_p" in data
    del data["top_p"]
    path.write_text(json.dumps(data))
    legacy = GoatModel.from_pretrained(tiny_llama(), saved_llama)
    assert legacy.goat_config.routing == "top_k" and legacy.goat_config == reference.goat_config
    assert all(layer.routing == "top_k" for layer in legacy.goat_layers())
    batch = {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        assert torch.equal(model_output(legacy, batch), model_output(reference, batch))


def test_the_v0_1_0_fixture_adapter_loads_as_top_k(minilm):
    """The adapter of tests/fixtures/legacy_run_v0.1.0, written by goat-lora 0.1.0 (no routing fields)."""
    from pathlib import Path

    adapter = Path(__file__).parent / "fixtures" / "legacy_run_v0.1.0" / "adapter"
    assert "routing" not in json.loads((adapter / CONFIG_NAME).read_text())
    model = GoatModel.from_pretrained(minilm, adapter)
    assert (model.goat_config.routing, model.goat_config.top_k) == ("top_k", 2)
    assert all(layer.routing == "top_k" and layer.num_shared == 0 for layer in model.goat_layers())


def test_shared_config_on_top_k_weights_is_refused(saved_llama):
    """A config that says "shared" over weights saved with a top-k router (E outputs, not E - 1)."""
    path = saved_llama / CONFIG_NAME
    path.write_text(json.dumps(json.loads(path.read_text()) | {"routing": "shared"}))
    with pytest.raises(ValueError, match=r"router.weight has shape \(8, 32\), expected \(7, 32\)"):
        GoatModel.from_pretrained(tiny_llama(), saved_llama)
