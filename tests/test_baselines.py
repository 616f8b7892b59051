"""The paper's other baselines: KaSA and LoRA-GA through peft's own configs, and MixLoRA on this project's
routing. Each trains, saves and reloads with the same test metrics; LoRA-GA's start comes from the run's
gradients and its cost is reported apart; MixLoRA routes each FFN block as a whole; a peft without the
method is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from goat_lora.cli import main
from goat_lora.config import GoatConfig
from goat_lora.inject import find_target_modules
from goat_lora.methods import method_defaults, method_loss, prepare_model
from goat_lora.methods.mixlora import MixLoraExperts, MixLoraRouter, find_ffn_blocks
from goat_lora.settings import RunSettings
from goat_lora.testing import minilm_vocab_bert, tiny_bert, tiny_llama, token_batch

TINY = ["--max-length", "16", "--epochs", "1", "--batch-size", "8", "--logging-steps", "1", "--report-to", "none"]


def spec(method: str, **knobs) -> RunSettings:
    settings = RunSettings(method=method, **{"r": 4, "num_experts": 3, "top_k": 2, "dropout": 0.0, **knobs})
    return settings.replace(**{k: v for k, v in method_defaults(settings).items() if getattr(settings, k) is None})


def _targets(model):
    return find_target_modules(model, GoatConfig(target_modules="all-linear", modules_to_save=["classifier"]))


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A 2-layer BERT (hidden 32) with the MiniLM tokenizer's vocabulary, saved to disk."""
    folder = tmp_path_factory.mktemp("bert") / "tiny-bert"
    model, tokenizer = minilm_vocab_bert(seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method", ["kasa", "lora_ga", "mixlora"])
def test_train_save_then_eval_reloads_the_same_model(tmp_path, reviews, tiny_bert_dir, method):
    """`goat eval` rebuilds the method on a fresh base and loads the run's tensors: the same test loss
    (a continuous value) as the trained model. LoRA-GA's base weights came from the run's gradients, so
    its folder keeps them; without them the reloaded model would differ."""
    out = tmp_path / method
    argv = [
        "train",
        "--method",
        method,
        "--model",
        tiny_bert_dir,
        "--data",
        reviews,
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--train-size",
        "32",
        "--lr",
        "3e-3",
        "--output",
        str(out),
        *TINY,
        "--save-steps",
        "0",
        "--lora-ga-batches",
        "2",
    ]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(["eval", "--adapter", str(out), "--output", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for name in ("accuracy", "macro_f1", "loss"):
        assert again[f"test_{name}"] == pytest.approx(metrics[f"test_{name}"], rel=1e-6, abs=1e-7), name
    logged = metrics["train_loss"]  # the trainer adds MixLoRA's balance loss and KaSA's regularisers, and logs them
    assert logged and all(("aux_loss" in row) == (method != "lora_ga") for row in logged)
    if method == "lora_ga":  # the gradient estimate: the knob's batches, timed apart from training
        cost = metrics["lora_ga_init"]
        assert cost["batches"] == 2 and cost["examples"] == 16 and 0 < cost["gradient_s"] <= cost["seconds"]
        assert cost["seconds"] < metrics["wall_time_s"] - metrics["train_time_s"]
    if method == "mixlora":
        assert metrics["router"]["layers"] == 2 and again["expert_load"] == metrics["expert_load"]
        assert all(len(load) == 8 for load in metrics["expert_load"].values())  # --experts default 8


def test_lora_ga_starts_from_the_gradient_and_at_the_pretrained_model():
    """With batches, peft's LoRA-GA puts the gradient's singular vectors in A (orthonormal rows) and a
    non-zero B, and subtracts s B0 A0 from the base weight: the first output is the pretrained one."""
    batch = {**token_batch(), "labels": torch.tensor([0, 1])}
    with torch.no_grad():
        expected = tiny_bert()(**batch).logits
    model = tiny_bert()
    prepared = prepare_model("lora_ga", model, spec("lora_ga"), _targets(model), ["classifier"], batches=[batch])
    prepared.eval()
    with torch.no_grad():
        torch.testing.assert_close(prepared(**batch).logits, expected, atol=2e-5, rtol=1e-4)
    query = prepared.base_model.model.bert.encoder.layer[0].attention.self.query
    A, B = query.lora_A["default"].weight, query.lora_B["default"].weight
    torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-4, rtol=0)
    assert B.abs().sum() > 0
    assert prepared.goat_init_cost["lora_ga_init"]["batches"] == 1


def _ffn_reference(layer, x, router, experts_in, experts_out):
    """MixLoRA's block by its definition, one token and one expert at a time:
    sum_{j in top-k} w_j [(W2 + s B2_j A2_j) gelu((W1 + s B1_j A1_j) x + b1) + b2]."""
    r, out = experts_in.rank, []
    probs = torch.softmax(router.gate(x), dim=-1)
    for t in range(x.shape[0]):
        top = probs[t].topk(router.top_k)
        weights = top.values / top.values.sum()
        total = 0
        for w, j in zip(weights, top.indices.tolist()):
            sl = slice(j * r, (j + 1) * r)
            W1 = experts_in.base_layer.weight + experts_in.scaling * experts_in.lora_B[:, sl] @ experts_in.lora_A[sl]
            W2 = (
                experts_out.base_layer.weight + experts_out.scaling * experts_out.lora_B[:, sl] @ experts_out.lora_A[sl]
            )
            hidden = torch.nn.functional.gelu(W1 @ x[t] + experts_in.base_layer.bias)
            total = total + w * (W2 @ hidden + experts_out.base_layer.bias)
        out.append(total)
    return torch.stack(out)


def test_mixlora_routes_the_whole_ffn_block_per_token():
    """The slot layout (input layer -> (T, k, m), elementwise activation, output layer mixes the k slots)
    equals the per-token, per-expert definition; attention gets peft's plain LoRA."""
    from peft.tuners.lora import LoraLayer

    model = tiny_bert()
    targets = _targets(model)
    blocks = find_ffn_blocks(targets)
    assert [b[1] for b in blocks] == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    prepared = prepare_model("mixlora", model, spec("mixlora"), targets, ["classifier"])
    layer = prepared.base_model.model.bert.encoder.layer[0]
    experts_in, experts_out = layer.intermediate.dense, layer.output.dense
    assert isinstance(experts_in, MixLoraExperts) and isinstance(experts_out, MixLoraExperts)
    assert isinstance(layer.attention.self.query, LoraLayer) and isinstance(layer.attention.output.dense, LoraLayer)
    with torch.no_grad():
        for p in (experts_in.lora_B, experts_out.lora_B):
            p.normal_(generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    got = experts_out(layer.intermediate.intermediate_act_fn(experts_in(x)))
    expected = _ffn_reference(layer, x.reshape(-1, 32), experts_in.router, experts_in, experts_out)
    torch.testing.assert_close(got.reshape(-1, 32), expected, atol=1e-5, rtol=1e-5)
    trainable = {n.split(".")[-1] for n, p in prepared.named_parameters() if p.requires_grad}
    assert {"lora_A", "lora_B", "weight", "bias"} <= trainable  # experts, attention LoRA, router gate, head


def test_mixlora_starts_at_the_pretrained_model_and_its_balance_loss_reaches_the_router():
    batch = token_batch()
    with torch.no_grad():
        expected = tiny_bert()(**batch).logits
    model = tiny_bert()
    prepared = prepare_model("mixlora", model, spec("mixlora"), _targets(model), ["classifier"])
    prepared.eval()
    with torch.no_grad():
        torch.testing.assert_close(prepared(**batch).logits, expected, atol=2e-5, rtol=1e-4)
    prepared.train()
    prepared(**batch)
    term, logged = method_loss(prepared, 0.5)
    routers = [m for m in prepared.modules() if isinstance(m, MixLoraRouter)]
    assert len(routers) == 2 and term.item() == pytest.approx(0.5 * logged.item())
    assert logged.item() == pytest.approx(sum(r.balance_loss().item() for r in routers))
    term.backward()
    assert all(r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() > 0 for r in routers)


def test_kasa_adds_peft_regularisers_to_the_loss():
    model = tiny_bert()
    prepared = prepare_model("kasa", model, spec("kasa"), _targets(model), ["classifier"])
    term, logged = method_loss(prepared, 0.5)
    expected = float(prepared.base_model._get_kasa_loss().detach())
    assert term is logged and float(term.detach()) == pytest.approx(expected) and expected > 0
    lora = tiny_bert()
    assert method_loss(prepare_model("lora", lora, spec("lora"), _targets(lora), ["classifier"]), 0.5) is None


@pytest.mark.parametrize("method, attribute", [("kasa", "KasaConfig"), ("lora_ga", "LoraGAConfig")])
def test_a_peft_without_the_method_is_refused_in_one_line(
    tmp_path, reviews, tiny_bert_dir, capsys, monkeypatch, method, attribute
):
    import peft

    monkeypatch.delattr(peft, attribute)
    argv = [
        "train",
        "--method",
        method,
        "--model",
        tiny_bert_dir,
        "--data",
        reviews,
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--train-size",
        "16",
        "--output",
        str(tmp_path / "r"),
        *TINY,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--method {method} needs peft >= 0.21.2" in err[0] and peft.__version__ in err[0], err
    assert not (tmp_path / "r").exists()


def test_compare_gives_kasa_and_lora_ga_goat_parameter_budget(tmp_path, reviews, tiny_bert_dir):
    """--budget params: KaSA and LoRA-GA get the rank whose trainable count is within 10% of GOAT's."""
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--model",
        tiny_bert_dir,
        "--data",
        reviews,
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--train-size",
        "24",
        "--methods",
        "goat",
        "kasa",
        "lora_ga",
        "--seeds",
        "1",
        "--lrs",
        "1e-3",
        "--rank",
        "4",
        "--experts",
        "2",
        "--output",
        str(out),
        *TINY,
    ]
    assert main(argv) == 0
    ranks = json.loads((out / "report.json").read_text())["settings"]["ranks"]
    target = ranks["_goat_target"]["trainable_params"]
    for label in ("kasa", "lora_ga"):
        assert ranks[label]["within_budget"] is True and abs(ranks[label]["trainable_params"] - target) <= 0.1 * target
    assert (
        json.loads((out / "runs" / "lora_ga-lr0.001-seed0" / "metrics.json").read_text())["lora_ga_init"]["batches"]
        >= 1
    )


@pytest.mark.parametrize("method", ["kasa", "lora_ga", "mixlora"])
def test_the_new_methods_adapt_the_same_layers_as_lora(method):
    from peft.tuners.lora import LoraLayer

    def adapted(prepared):
        return {
            name.removeprefix("base_model.model.")
            for name, m in prepared.named_modules()
            if isinstance(m, (LoraLayer, MixLoraExperts))
        }

    lora, other = tiny_bert(), tiny_bert()
    targets = _targets(lora)
    expected = adapted(prepare_model("lora", lora, spec("lora"), targets, ["classifier"]))
    assert (
        expected == set(targets)
        and adapted(prepare_model(method, other, spec(method), targets, ["classifier"])) == expected
    )


def test_mixlora_on_a_llama_block_routes_gate_and_up_together():
    """Llama's FFN, down(silu(gate(x)) * up(x)): gate_proj routes, up_proj follows the same choice, and
    down_proj mixes; the model starts at the pretrained one and trains."""
    batch = token_batch()
    with torch.no_grad():
        expected = tiny_llama()(**batch).logits
    model = tiny_llama()
    targets = find_target_modules(model, GoatConfig(target_modules="all-linear"))
    blocks = find_ffn_blocks(targets)
    assert blocks[0] == (["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"], "model.layers.0.mlp.down_proj")
    prepared = prepare_model("mixlora", model, spec("mixlora"), targets, [])
    mlp = prepared.base_model.model.model.layers[0].mlp
    assert mlp.gate_proj.routes and not mlp.up_proj.routes and mlp.down_proj.mixes
    assert mlp.up_proj._router[0] is mlp.gate_proj.router and not hasattr(mlp.up_proj, "router")
    prepared.eval()
    with torch.no_grad():
        torch.testing.assert_close(prepared(**batch).logits, expected, atol=2e-5, rtol=1e-4)
    prepared.train()
    prepared(**batch, labels=batch["input_ids"]).loss.backward()
    assert mlp.up_proj.lora_A.grad is not None and mlp.gate_proj.router.gate.weight.grad is not None


def test_mixlora_counts_each_token_once_under_activation_checkpointing():
    """Checkpointing re-runs the block's forward inside backward; the experts' load must count it once."""
    model = tiny_bert()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prepared = prepare_model("mixlora", model, spec("mixlora"), _targets(tiny_bert()), ["classifier"])
    prepared.train()
    prepared(**token_batch(), labels=torch.tensor([0, 1])).loss.backward()
    routers = [m for m in prepared.modules() if isinstance(m, MixLoraRouter)]
    assert [float(r.slot_counts.sum()) for r in routers] == [2 * 7 * 2] * 2  # tokens x top_k, per block


def test_mixlora_top_k_above_its_experts_is_refused_in_one_line(tmp_path, reviews, capsys):
    argv = [
        "train",
        "--method",
        "mixlora",
        "--experts",
        "4",
        "--top-k",
        "5",
        "--data",
        reviews,
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--output",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--method mixlora: --top-k 5 must be between 1 and --experts 4" in err[0], err
