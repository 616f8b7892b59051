"""Where users already are: peft loads GOAT adapters (register_with_peft), lm-evaluation-harness
scores them (goat eval --harness, and lm-eval's own peft= route), disable_adapter() gives the pretrained
model (a frozen reference in a training step), several adapters share one base with exact switching,
and TRL's SFT trainer trains with the balance loss. lm-eval and TRL tests skip when those are missing.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import MODEL_CASES, model_output

from goat_lora import GoatConfig, GoatLayer, GoatModel, get_goat_model
from goat_lora.layer import base_weight_2d
from goat_lora.testing import save_tiny_decoder, tiny_llama, token_batch

EXAMPLE_TASKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "harness")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that +0.0 and -0.0 (equal numbers) count as different."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(model_a, model_b) -> None:
    params_a, params_b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name, p in params_a.items():
        assert torch.equal(bits(p.detach()), bits(params_b[name].detach())), name


def trained(model: GoatModel, seed: int) -> GoatModel:
    """Move every trainable tensor away from its initial value, as training would (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param))
    return model


def saved_case(case: str, folder, seed: int = 1, **overrides):
    """(base factory, inputs) of a MODEL_CASES case whose adapter, trained as above, is saved in `folder`."""
    factory, kwargs, inputs, _ = MODEL_CASES[case]
    model = trained(get_goat_model(factory(), GoatConfig(**{**kwargs, **overrides})), seed)
    model.save_pretrained(folder)
    return factory, inputs()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model, inputs)


# ---- peft: PeftModel.from_pretrained / PeftConfig.from_pretrained ---------------------------------------

PEFT_CASES = [
    "llama-all-linear-defaults",
    "bert-cls-modules_to_save",
    "gpt2-conv1d-principal",
    "bert-shared-expert",
    "conv2d-1x1",
]


def check_peft_loading(case: str, folder: str) -> dict:
    """What a peft version must satisfy (run in this process, and under other pefts by a subprocess)."""
    import peft

    from goat_lora import register_with_peft

    factory, inputs = saved_case(case, folder)
    register_with_peft()
    register_with_peft()  # idempotent
    expected = logits(GoatModel.from_pretrained(factory(), folder), inputs)
    model = peft.PeftModel.from_pretrained(factory(), folder)
    assert torch.equal(logits(model, inputs), expected)  # the same model, bit for bit
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    trainable = peft.PeftModel.from_pretrained(factory(), folder, is_trainable=True)
    goat = GoatModel.from_pretrained(factory(), folder, is_trainable=True)
    assert sum(p.requires_grad for p in trainable.parameters()) == sum(p.requires_grad for p in goat.parameters())
    config = peft.PeftConfig.from_pretrained(folder)
    assert config.peft_type == "GOAT" and config.goat_config == GoatConfig.load(
        os.path.join(folder, "adapter_config.json")
    )
    return {"peft": peft.__version__, "case": case}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_loads_a_goat_adapter_with_the_same_logits(case, tmp_path):
    check_peft_loading(case, str(tmp_path))


def test_register_refuses_at_once_when_a_mapping_moved(monkeypatch):
    """A peft that moved one of the dictionaries gets one error naming its version, and none is written."""
    import peft.mapping
    import peft.peft_model

    from goat_lora import register_with_peft

    monkeypatch.delitem(peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING, "GOAT", raising=False)
    monkeypatch.delattr(peft.peft_model, "PEFT_TYPE_TO_TUNER_MAPPING", raising=False)
    monkeypatch.delattr(peft.peft_model, "PEFT_TYPE_TO_MODEL_MAPPING", raising=False)
    with pytest.raises(RuntimeError, match=rf"peft {peft.__version__} .*tuner mapping"):
        register_with_peft()
    assert "GOAT" not in peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING


def test_peft_without_an_adapter_folder_is_refused():
    import peft

    from goat_lora import register_with_peft
    from goat_lora.peft_integration import GoatPeftConfig

    register_with_peft()
    with pytest.raises(ValueError, match="PeftModel.from_pretrained"):
        peft.PeftModel(tiny_llama(), GoatPeftConfig(r=4, num_experts=2))
    with pytest.raises(ValueError, match="unknown GoatConfig field"):
        GoatPeftConfig(rank=4)


@pytest.mark.skipif(
    not os.environ.get("GOAT_PEFT_PYTHONS"),
    reason="GOAT_PEFT_PYTHONS (python executables with "
    "another peft, colon-separated) is not set; docs/usage.md says how it was run",
)
@pytest.mark.parametrize("case", ["llama-all-linear-defaults", "bert-cls-modules_to_save"])
def test_other_peft_versions(case, tmp_path):
    """The same check under other pefts (throwaway venvs); a peft older than 0.14 must refuse with one error."""
    here = os.path.dirname(__file__)
    src = os.path.join(os.path.dirname(here), "src")
    for index, python in enumerate(os.environ["GOAT_PEFT_PYTHONS"].split(":")):
        script = (
            f"import sys, json; sys.path[:0] = [{here!r}, {src!r}]; import peft; from test_interop import "
            f"check_peft_loading\ntry:\n"
            f"    print(json.dumps(check_peft_loading({case!r}, {str(tmp_path / str(index))!r})))\n"
            f"except RuntimeError as err:\n    print(json.dumps({{'peft': peft.__version__, 'refused': str(err)}}))"
        )
        done = subprocess.run(
            [python, "-c", script],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        major_minor = tuple(int(x) for x in result["peft"].split(".")[:2])
        if major_minor < (0, 14):
            assert f"peft {result['peft']}" in result["refused"] and "\n" not in result["refused"]
        else:
            assert "refused" not in result, result


# ---- disable_adapter() -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_disable_adapter_gives_the_pretrained_model(case):
    factory, kwargs, make_inputs, _ = MODEL_CASES[case]
    inputs = make_inputs()
    original = factory()
    model = trained(get_goat_model(copy.deepcopy(original), GoatConfig(**kwargs)), seed=3).eval()
    adapted = logits(model, inputs)
    model.reset_expert_load()
    with model.disable_adapter():
        inside = model_output(model, inputs)
        assert not inside.requires_grad
    torch.testing.assert_close(inside, logits(original, inputs), atol=1e-5, rtol=1e-5)  # float32 rounding
    assert not torch.allclose(inside, adapted, atol=1e-3)  # the adapter does change the outputs
    assert all(float(layer.load_counts.sum()) == 0 for layer in model.goat_layers())  # nothing routed inside
    assert torch.equal(logits(model, inputs), adapted)  # and on exit, exactly the adapted model


def test_disable_adapter_in_bfloat16_is_within_its_rounding():
    """Per layer: (W0 - W_res) x + b + W_res x, each step rounded to bfloat16, against W0 x + b."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    original = copy.deepcopy(linear)
    model = trained(get_goat_model(torch.nn.Sequential(linear), GoatConfig(r=8, num_experts=4)), seed=2)
    x = torch.randn(5, 64).to(torch.bfloat16)
    with model.disable_adapter():
        y = model(x).float()
    y0 = original(x).float()
    layer = next(model.goat_layers())
    residual_x = layer.residual_forward(x.float()).abs()
    bound = 2**-7 * (y0.abs() + residual_x + (original.weight.float().abs() @ x.float().abs().T).T)  # two roundings
    assert ((y - y0).abs() <= bound).all()


def test_disable_adapter_as_a_frozen_reference_in_a_training_step():
    """Policy forward, then a reference forward inside the context (DPO / KL style), then backward: the
    weights the policy's graph holds were not touched, the balance loss is the policy's, the routers learn."""
    model = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=4, aux_loss_coef=1e-2)).train()
    batch = token_batch()
    out = model(**batch, labels=batch["input_ids"])
    aux_before = float(model.aux_loss().detach())
    load_before = {k: v.clone() for k, v in model.expert_load().items()}
    with model.disable_adapter():
        reference = model(**batch).logits
    assert not reference.requires_grad
    torch.testing.assert_close(reference, logits(tiny_llama(), batch), atol=1e-5, rtol=1e-5)
    assert float(model.aux_loss()) == aux_before  # the reference forward recorded no routing
    assert all(torch.equal(v, load_before[k]) for k, v in model.expert_load().items())
    log_p = torch.log_softmax(out.logits, -1)
    kl = (log_p.exp() * (log_p - torch.log_softmax(reference, -1))).sum(-1).mean()
    loss = out.loss + 0.1 * kl + model.goat_config.aux_loss_coef * model.aux_loss()
    loss.backward()  # would fail had the context rewritten a weight saved by the policy's graph
    for layer in model.goat_layers():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_disable_adapter_uses_the_original_modules_to_save_and_nests():
    from goat_lora.testing import tiny_bert

    batch = token_batch()
    original = tiny_bert()
    model = trained(
        get_goat_model(copy.deepcopy(original), GoatConfig(r=8, num_experts=4, modules_to_save=["classifier"])), seed=4
    )
    head = model.base_model.classifier
    with model.disable_adapter():
        assert model.base_model.classifier is not head
        with model.disable_adapter():
            nested = logits(model, batch)
        with pytest.raises(RuntimeError, match="inside disable_adapter"):
            model.add_adapter("other", GoatConfig(r=8, num_experts=4))
        with pytest.raises(RuntimeError, match="inside disable_adapter"):
            model.unload()
        outer = logits(model, batch)
    assert model.base_model.classifier is head
    torch.testing.assert_close(nested, logits(original, batch), atol=1e-5, rtol=1e-5)
    assert torch.equal(nested, outer)
    assert head.weight.requires_grad and not torch.equal(head.weight, original.classifier.weight)


# ---- several adapters on one base ---------------------------------------------------------------------

SWITCH_CASES = ["llama-all-linear-defaults", "llama-qv-goat_mini", "llama-top-p", "llama-zero-init"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switching_gives_the_logits_of_loading_each_adapter_alone(tmp_path, dtype):
    inputs = token_batch()
    folders = {}
    for index, case in enumerate(SWITCH_CASES):  # four adapters with different targets, routing and init
        factory, kwargs, _, _ = MODEL_CASES[case]
        folders[case] = str(tmp_path / case)
        trained(get_goat_model(tiny_llama(dtype=dtype), GoatConfig(**kwargs)), seed=index + 1).save_pretrained(
            folders[case]
        )
    alone = {
        case: logits(GoatModel.from_pretrained(tiny_llama(dtype=dtype), folder), inputs)
        for case, folder in folders.items()
    }
    original = tiny_llama(dtype=dtype)
    model = GoatModel.from_pretrained(tiny_llama(dtype=dtype), folders[SWITCH_CASES[0]], adapter_name=SWITCH_CASES[0])
    for case in SWITCH_CASES[1:]:
        model.load_adapter(folders[case], case)
        assert torch.equal(logits(model, inputs), alone[SWITCH_CASES[0]])  # loading does not change the active one
    assert model.adapters[0] == model.active_adapter == SWITCH_CASES[0] and sorted(model.adapters) == sorted(
        SWITCH_CASES
    )
    for case in [
        "llama-top-p",
        "llama-qv-goat_mini",
        SWITCH_CASES[0],
        "llama-zero-init",
        "llama-top-p",
        "llama-qv-goat_mini",
    ]:
        model.set_adapter(case)
        assert model.active_adapter == case and model.active_adapters == [case]
        assert torch.equal(logits(model, inputs), alone[case]), case
    assert_same_bits(model.unload(), original)  # the base weights after all the switches: bit for bit


def test_unload_gives_back_the_original_bits_for_every_case():
    for case, (factory, kwargs, _, _) in MODEL_CASES.items():
        original = factory()
        assert_same_bits(get_goat_model(copy.deepcopy(original), GoatConfig(**kwargs)).unload(), original)
    minilm_like = tiny_llama(dtype=torch.bfloat16)
    assert_same_bits(get_goat_model(copy.deepcopy(minilm_like), GoatConfig()).unload(), minilm_like)


def test_add_adapter_equals_get_goat_model_on_the_original_base():
    inputs = token_batch()
    config = GoatConfig(r=8, num_experts=4, top_k=1, target_modules=["q_proj", "o_proj", "down_proj"], seed=5)
    fresh = get_goat_model(tiny_llama(), config).eval()
    model = trained(get_goat_model(tiny_llama(), GoatConfig()), seed=6).eval()
    before = logits(model, inputs)
    model.add_adapter("new", config)
    assert torch.equal(logits(model, inputs), before) and model.active_adapter == "default"
    model.set_adapter("new")
    assert torch.equal(logits(model, inputs), logits(fresh, inputs))
    model.set_adapter("default")
    assert torch.equal(logits(model, inputs), before)


def test_an_optimizer_keeps_its_parameters_across_switches():
    model = get_goat_model(tiny_llama(), GoatConfig(r=4, num_experts=2))
    mine = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.add_adapter("other", GoatConfig(r=8, num_experts=4))
    model.set_adapter("other")
    assert not any(p is q for p in mine.values() for q in model.parameters())  # left the model
    model.set_adapter("default")
    back = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert back.keys() == mine.keys() and all(back[n] is mine[n] for n in mine)  # the same objects


def test_save_selected_adapters_in_peft_layout_and_modules_to_save_per_adapter(tmp_path):
    from goat_lora.testing import tiny_bert

    batch = token_batch()
    original = tiny_bert()
    config = GoatConfig(r=8, num_experts=4, modules_to_save=["classifier"])
    model = trained(get_goat_model(copy.deepcopy(original), config), seed=7).eval()
    first = logits(model, batch)
    model.add_adapter("second", config)
    model.set_adapter("second")
    trained(model, seed=8)  # its own head and experts
    second = logits(model, batch)
    model.set_adapter("default")
    assert torch.equal(logits(model, batch), first)
    model.save_pretrained(tmp_path, selected_adapters=["default", "second"])
    assert (tmp_path / "adapter_config.json").is_file() and (
        tmp_path / "second" / "adapter_model.safetensors"
    ).is_file()
    assert model.active_adapter == "default"
    assert torch.equal(logits(GoatModel.from_pretrained(tiny_bert(), tmp_path), batch), first)
    assert torch.equal(logits(GoatModel.from_pretrained(tiny_bert(), tmp_path / "second"), batch), second)
    assert_same_bits(model.unload(), original)  # both heads gone, the original one back


def test_adapter_names_are_checked():
    model = get_goat_model(tiny_llama(), GoatConfig(r=4, num_experts=2)).eval()
    model.add_adapter("b", GoatConfig(r=4, num_experts=2))
    with pytest.raises(ValueError, match="exists already"):
        model.add_adapter("b", GoatConfig(r=4, num_experts=2))
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        model.set_adapter("c")
    with pytest.raises(ValueError, match="is active"):
        model.delete_adapter("default")
    for bad in ("", "a/b", "a.b"):
        with pytest.raises(ValueError, match="adapter name"):
            model.add_adapter(bad, GoatConfig())
    before = logits(model, token_batch())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.load_adapter("/nonexistent/adapter", "d")
    assert torch.equal(logits(model, token_batch()), before)  # a failed load leaves the active adapter as it was
    assert model.adapters == ["default", "b"]
    model.delete_adapter("b")
    assert model.adapters == ["default"]


def test_an_inactive_adapter_holds_its_checkpoint_tensors_only():
    """Memory per extra adapter: per layer 2 r (m + n) + R n + E float32 (+ E float64 of load counts)."""
    config = GoatConfig(r=8, num_experts=4)
    model = get_goat_model(tiny_llama(), GoatConfig(r=4, num_experts=2))
    model.add_adapter("b", config)
    parked = model._inactive["b"].adapted.layers
    expected = 0
    for layer in parked.values():
        m, n = layer.out_features, layer.in_features
        expected += 2 * config.r * (m + n) + config.num_routed_experts * n + config.num_experts
        assert layer._restore_patch is None  # no exactness patch while inactive
    held = sum(
        t.numel()
        for layer in parked.values()
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]
        if not name.startswith("base_layer.") and name != "load_counts"
    )
    assert held == expected


def test_the_restore_patch_is_small():
    """About 1% of the adapted weights' bytes (0.64% of MiniLM's float32 entries, measured in layer.py's note)."""
    model = get_goat_model(tiny_llama(hidden=64), GoatConfig())
    entries = sum(layer.base_layer.weight.numel() for layer in model.goat_layers())
    patched = sum(layer._restore_patch[0].numel() for layer in model.goat_layers())
    assert 0 < patched < 0.05 * entries
    assert all(
        isinstance(layer, GoatLayer) and base_weight_2d(layer.base_layer).dtype == torch.float32
        for layer in model.goat_layers()
    )


# ---- lm-evaluation-harness ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    """A tiny LLaMA (BPE tokenizer) and a GOAT causal-lm run on it."""
    from goat_lora.cli import main

    root = tmp_path_factory.mktemp("harness")
    decoder = save_tiny_decoder(root / "decoder")
    run = root / "run"
    assert (
        main(
            [
                "train",
                "--task",
                "causal-lm",
                "--model",
                decoder,
                "--data",
                "instructions",
                "--train-size",
                "16",
                "--test-size",
                "4",
                "--max-length",
                "32",
                "--batch-size",
                "8",
                "--rank",
                "4",
                "--experts",
                "2",
                "--top-k",
                "1",
                "--lr",
                "1e-2",
                "--epochs",
                "1",
                "--save-steps",
                "0",
                "--report-to",
                "none",
                "--output",
                str(run),
            ]
        )
        == 0
    )
    return decoder, str(run)


def test_goat_eval_harness_and_the_lm_eval_peft_route_agree(decoder_run, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'goat-lora[eval]')")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from goat_lora import register_with_peft
    from goat_lora.cli import main

    decoder, run = decoder_run
    code = main(
        [
            "eval",
            "--adapter",
            run,
            "--harness",
            "goat_capitals",
            "--harness-include",
            EXAMPLE_TASKS,
            "--harness-limit",
            "12",
            "--output",
            str(tmp_path / "h"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "goat_capitals" in printed and "acc" in printed
    ours = json.loads((tmp_path / "h" / "harness.json").read_text())["results"]["goat_capitals"]
    assert 0.0 <= ours["acc,none"] <= 1.0
    # lm-eval's own route: a path and peft=, which loads the GOAT adapter through peft after registration
    register_with_peft()
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": decoder, "peft": os.path.join(run, "adapter"), "dtype": "float32"},
        tasks=["goat_capitals"],
        task_manager=TaskManager(include_path=EXAMPLE_TASKS, include_defaults=False),
        limit=12,
        device="cpu",
    )["results"]["goat_capitals"]
    assert theirs["acc,none"] == ours["acc,none"] and theirs["acc_norm,none"] == ours["acc_norm,none"]


def test_harness_without_lm_eval_is_one_line_and_exit_2(monkeypatch, capsys):
    from goat_lora.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    assert main(["eval", "--adapter", "any-run", "--harness", "goat_capitals"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "goat-lora[eval]" in err


def test_harness_refuses_a_classification_run(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")
    from goat_lora.harness import harness_eval

    legacy = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_run_v0.1.0")
    try:
        with pytest.raises(ValueError, match="scores language models"):
            harness_eval(legacy, str(tmp_path / "h"), overrides={"harness": ["goat_capitals"]})
    except FileNotFoundError as err:  # the shipped MiniLM is not installed
        pytest.skip(str(err))


# ---- TRL -----------------------------------------------------------------------------------------------


def sft_trainer(decoder: str, output, coef: float = 1e-2, steps: int = 3):
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'goat-lora[trl]')")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from goat_lora.trl import GoatSFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(decoder)
    goat = get_goat_model(
        AutoModelForCausalLM.from_pretrained(decoder),
        GoatConfig(r=4, num_experts=2, top_k=1, dropout=0.0, aux_loss_coef=coef),
    )
    data = Dataset.from_dict(
        {
            "text": [
                "The capital of France is Paris.",
                "Two and two make four.",
                "Water boils at 100 degrees.",
                "The sky is blue.",
            ]
            * 4
        }
    )
    # bf16=False: TRL's default is bfloat16 autocast, also on the CPU, and the reference is compared in float32
    args = SFTConfig(
        output_dir=str(output),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        max_length=32,
        use_cpu=True,
        disable_tqdm=True,
        bf16=False,
    )
    return GoatSFTTrainer(model=goat, args=args, train_dataset=data, processing_class=tokenizer), tokenizer


def test_goat_sft_trainer_adds_the_balance_loss_and_it_reaches_the_routers(decoder_run, tmp_path):
    from trl import SFTTrainer

    trainer, _ = sft_trainer(decoder_run[0], tmp_path, coef=0.5)
    goat = trainer.goat_model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    routers = [layer.router.weight for layer in goat.goat_layers()]
    ours = trainer.compute_loss(trainer.model, dict(batch))  # no dropout: the two forwards route alike
    with_aux = torch.autograd.grad(ours, routers)
    plain = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))  # TRL's loss alone
    aux = goat.aux_loss()
    from_aux = torch.autograd.grad(0.5 * aux, routers, retain_graph=True)
    without = torch.autograd.grad(plain, routers)
    assert float(ours.detach() - plain.detach()) == pytest.approx(0.5 * float(aux.detach()), rel=1e-5)
    for a, b, c in zip(with_aux, without, from_aux):
        assert c.abs().sum() > 0
        torch.testing.assert_close(a - b, c, atol=1e-6, rtol=1e-4)


def test_goat_sft_trainer_trains_and_the_reference_forward_is_the_base(decoder_run, tmp_path):
    from transformers import AutoModelForCausalLM

    decoder = decoder_run[0]
    trainer, tokenizer = sft_trainer(decoder, tmp_path)
    goat = trainer.goat_model
    before = {n: p.detach().clone() for n, p in goat.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in goat.named_parameters() if n in before)
    assert all("goat_aux_loss" in row for row in trainer.state.log_history if "loss" in row)
    batch = dict(tokenizer(["The capital of France is", "Two and two"], return_tensors="pt", padding=True))
    goat.eval()
    with goat.disable_adapter():  # a DPO-style reference: the pretrained model, no second copy
        reference = goat(**batch).logits
    base = AutoModelForCausalLM.from_pretrained(decoder).eval()
    torch.testing.assert_close(reference, logits(base, batch), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(goat, batch), reference, atol=1e-3)


def test_goat_sft_trainer_refuses_other_models(decoder_run, tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed")
    from goat_lora.trl import GoatSFTTrainer

    with pytest.raises(ValueError, match="trains a GoatModel"):
        GoatSFTTrainer(model=tiny_llama())
