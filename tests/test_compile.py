"""torch.compile: a GOAT model compiles with fullgraph=True, in training mode (experts'
dropout, routing statistics, expert-load counts, the balance loss) and in eval mode, and the compiled
model computes what the eager one does.

Compiling is slow on a small CPU, so the models are tiny and the configurations few:
* graph breaks are counted by torch._dynamo.explain (tracing only, no code generation);
* compiled against eager uses the aot_eager backend: dynamo's graph through AOTAutograd (the
  functionalised forward and the partitioned backward that inductor would receive), run by eager
  kernels; the keep mask's operator also goes through inductor itself;
* MiniLM is the shipped checkpoint cut to its first encoder layer (the six layers are the same code).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
from test_scaleout import _flags, one_process, tiny_task  # noqa: F401  (module fixtures reused)

from goat_lora import GoatConfig, get_goat_model
from goat_lora.testing import tiny_llama, tiny_mlp, token_batch


def _mlp():
    model = get_goat_model(tiny_mlp(), GoatConfig(r=4, num_experts=2, top_k=1, dropout=0.0))
    return model, {"x": torch.randn(3, 4, 24)}


def _llama(**config):
    config = {"r": 8, "num_experts": 4, "dropout": 0.0, "aux_loss_ignore_padding": True, **config}
    model = get_goat_model(tiny_llama(), GoatConfig(**config))
    batch = token_batch()
    return model, {**batch, "labels": batch["input_ids"], "use_cache": False}


def _minilm(minilm, minilm_batch):
    minilm.bert.encoder.layer = minilm.bert.encoder.layer[:1]
    for module in minilm.modules():  # BERT's own dropouts would draw other numbers compiled
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = get_goat_model(minilm, GoatConfig(r=8, num_experts=4, dropout=0.0, modules_to_save=["classifier"]))
    return model, {**minilm_batch, "labels": torch.tensor([0, 1])}


def _model(name, request):
    if name == "mlp":
        return _mlp()
    if name == "llama":
        return _llama()
    return _minilm(request.getfixturevalue("minilm"), request.getfixturevalue("minilm_batch"))


def _loss(model, out) -> torch.Tensor:
    """The training loss: the task's (or a sum for the MLP) plus the balance loss."""
    task = out.sum() if isinstance(out, torch.Tensor) else out.loss
    return task + model.aux_loss()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["mlp", "llama", "minilm"])
def test_no_graph_breaks(name, mode, request):
    """One graph for the whole step: the model's forward and the balance loss (train mode with the
    experts' dropout on: 0.1 here), or the forward alone (eval)."""
    model, inputs = _model(name, request)
    for layer in model.goat_layers():
        layer.dropout = torch.nn.Dropout(0.1)
    getattr(model, mode)()

    def step(**kwargs):
        out = model(**kwargs)
        return _loss(model, out) if mode == "train" else out

    explained = torch._dynamo.explain(step)(**inputs)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _compiled_equals_eager(model, inputs, compile_model=None):
    """Two training steps of `model` compiled (fullgraph, aot_eager) against a deep copy run eagerly:
    outputs, balance loss, gradients (of the second step: the first one compiles) and expert loads."""
    eager = copy.deepcopy(model)
    compiled = torch.compile(compile_model or model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        results = []
        for runner, net in ((compiled, model), (eager, eager)):
            net.train()
            net.zero_grad(set_to_none=True)
            out = runner(**inputs)
            loss = _loss(net, out)
            loss.backward()
            logits = out if isinstance(out, torch.Tensor) else out.logits
            results.append((logits.detach(), net.aux_loss().detach(), _grads(net)))
        (out_c, aux_c, grads_c), (out_e, aux_e, grads_e) = results
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(aux_c, aux_e, rtol=1e-5, atol=1e-6)
        assert grads_c.keys() == grads_e.keys() and grads_c
        for key in grads_e:
            torch.testing.assert_close(grads_c[key], grads_e[key], rtol=1e-4, atol=1e-6, msg=key)
    for layer_c, layer_e in zip(model.goat_layers(), eager.goat_layers()):
        assert torch.equal(layer_c.load_counts, layer_e.load_counts)  # two forwards each, counted once


@pytest.mark.parametrize("name", ["mlp", "minilm"])
def test_compiled_training_step_equals_eager(name, request):
    _compiled_equals_eager(*_model(name, request))


@pytest.mark.parametrize("routing", ["top_p", "shared"])
def test_compiled_training_step_equals_eager_in_every_routing_mode(routing):
    """The adapter enters dynamo's graph as one opaque call (functional._routed_experts_node, allow_in_graph),
    so dynamo cannot see the routing mode inside it: top-p and the shared expert compile to what eager computes
    (and eager is checked against the per-expert loop in every mode, tests/test_layer.py)."""
    model = get_goat_model(tiny_mlp(), GoatConfig(r=6, num_experts=3, top_k=1, dropout=0.0, routing=routing, top_p=0.5))
    _compiled_equals_eager(model, {"x": torch.randn(3, 4, 24)})


def _assert_same_aux_loss_and_grads(model, other) -> None:
    """The balance loss and every trainable parameter's gradient of `model` equal `other`'s."""
    torch.testing.assert_close(model.aux_loss(), other.aux_loss())
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_llama_with_activation_checkpointing_equals_eager_and_records_routing_once():
    """Non-reentrant checkpointing compiled with the whole model: dynamo traces each checkpointed
    decoder layer as one region and, with skip_fwd_side_effects_in_bwd_under_checkpoint (what
    `goat train --compile` sets), records its routing statistics and expert-load counts once, in the
    forward; the compiled backward recomputes tensors, never Python. Compared with the same model
    checkpointed in eager mode and without checkpointing, padding left out of the balance loss (the
    eager checkpointed case failed before: its recompute no longer sees the token mask). Two adapted
    layers per block keep the compile short."""
    model, inputs = _llama(target_modules=["q_proj", "down_proj"])
    plain = copy.deepcopy(model)
    model.activation_checkpointing_enable()
    eager = copy.deepcopy(model)
    assert model.base_model.model.gradient_checkpointing and eager.base_model.model.gradient_checkpointing
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        for runner, net in ((compiled, model), (eager, eager), (plain, plain)):
            net.train()
            _loss(net, runner(**inputs)).backward()
    tokens = float(inputs["attention_mask"].sum())
    for other in (eager, plain):
        _assert_same_aux_loss_and_grads(model, other)
        for layer, other_layer in zip(model.goat_layers(), other.goat_layers()):
            assert float(layer.load_counts.sum()) == tokens * 2  # one forward's k=2 slots per real token
            assert torch.equal(layer.load_counts, other_layer.load_counts)


def test_compiled_keep_masks_are_the_eager_draws_one_per_call():
    """Under torch.compile the keep mask is one opaque operator that draws what eager draws: the same
    masks for the same seed through inductor, and two calls with equal arguments give two draws (in a
    training graph AOTAutograd's common-subexpression pass merges equal calls of an operator it does not
    know to be random)."""
    from goat_lora.layer import keep_mask

    def dropped_twice(x):
        return x * keep_mask(x.shape, 0.3, x.device), x * keep_mask(x.shape, 0.3, x.device)

    compiled = torch.compile(dropped_twice, fullgraph=True)
    x = torch.ones(600, 1000, requires_grad=True)
    torch.manual_seed(0)
    first, second = (out.detach() == 1 for out in compiled(x))
    torch.manual_seed(0)
    eager_first, eager_second = (out.detach() == 1 for out in dropped_twice(x))
    assert torch.equal(first, eager_first) and torch.equal(second, eager_second)
    assert not torch.equal(first, second)
    assert abs(1.0 - float(first.double().mean()) - 0.3) < 5 * (0.3 * 0.7 / first.numel()) ** 0.5


def test_compiled_training_with_the_experts_dropout_equals_eager_draw_for_draw():
    """With dropout on, a compiled step trains on the masks an eager step draws from the same seed, also
    with activation checkpointing, whose recompute replays the forward's masks (the operator is tagged
    as seeded random: the partitioner restores the generator state around it rather than drawing anew).
    Compared with the same model checkpointed eagerly and not checkpointed; q, k and v share one input,
    so equal mask calls in one block must stay three draws. Backend aot_eager_decomp_partition: the
    min-cut partitioner inductor uses. The generator ends where eager leaves it."""
    model, inputs = _llama(dropout=0.2, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    plain = copy.deepcopy(model)
    model.activation_checkpointing_enable()
    eager = copy.deepcopy(model)
    next_draws = []
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager_decomp_partition")
        for runner, net in ((compiled, model), (eager, eager), (plain, plain)):
            net.train()
            torch.manual_seed(1)
            _loss(net, runner(**inputs)).backward()
            next_draws.append(float(torch.rand(())))
    assert next_draws[0] == next_draws[1] == next_draws[2]
    for other in (eager, plain):
        _assert_same_aux_loss_and_grads(model, other)


def test_compiled_layer_drops_the_experts_inputs_with_probability_p():
    """A compiled GOAT layer in training mode: one token of 4000 features, so the gradient of lora_A's
    rows is g_i * (x * keep) and its zeros are the dropped features."""
    from goat_lora.layer import GoatLayer  # noqa: F401  (the layer under test)

    model = get_goat_model(
        torch.nn.Sequential(torch.nn.Linear(4000, 8)), GoatConfig(r=2, num_experts=2, top_k=2, dropout=0.3)
    )
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.rand(1, 4000) + 0.5  # no zero feature
    compiled(x).sum().backward()
    grad = model.base_model[0].lora_A.grad  # (2, 4000)
    dropped = float((grad[0] == 0).double().mean())
    assert abs(dropped - 0.3) < 5 * (0.3 * 0.7 / 4000) ** 0.5
    assert torch.equal(grad[0] == 0, grad[1] == 0)  # one mask per input element, shared by the experts


def _saved_input_sized(step, x) -> tuple[int, int]:
    """What autograd saves for backward in one call of step(x), among tensors of x's size: the number
    of distinct float tensors (storages) and of bool ones."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = step(x)
    loss.backward()
    storages = {(t.untyped_storage().data_ptr(), t.dtype) for t in saved if t.numel() == x.numel()}
    return sum(dtype.is_floating_point for _, dtype in storages), sum(dtype == torch.bool for _, dtype in storages)


def test_compiled_layer_saves_no_float_copy_of_the_dropped_input():
    """Under torch.compile a GOAT layer with dropout keeps what it keeps eagerly: its input (the router
    needs it) and the 1-byte mask, not a float copy of x * keep. Backend aot_eager_decomp_partition:
    the min-cut partitioner inductor uses, run by eager kernels. With a backward that multiplied by the
    mask, CSE merged it into the forward's product and each layer saved one more float tensor."""
    torch.manual_seed(0)
    width = 48
    base = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width))
    model = get_goat_model(base, GoatConfig(r=8, num_experts=4, top_k=2, dropout=0.1, target_modules=["0", "2"]))
    model.train()

    def step(x):
        return model(x).sum() + model.aux_loss()

    x = torch.randn(256, width)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager_decomp_partition")
    compiled(x).backward()  # compiles
    eager_floats, eager_masks = _saved_input_sized(step, x)
    compiled_floats, compiled_masks = _saved_input_sized(compiled, x)
    assert (eager_floats, eager_masks) == (3, 2)  # x, the GELU's input, its output (layer 2's x); two masks
    assert compiled_floats == eager_floats and compiled_masks == eager_masks


def test_goat_train_compile_matches_eager(tiny_task, one_process, tmp_path, monkeypatch):  # noqa: F811
    """`goat train --compile` compiles the model regionally (each repeated block once, accelerate's
    compile_regions) and gives the eager run's per-step losses, balance losses and expert balance.
    Backend eager (dynamo's graph run by eager kernels): the Trainer's path to the compiled model is
    what is tested here; AOTAutograd is tested above, and inductor's code generation takes minutes on
    this CPU."""
    import json

    import accelerate.accelerator

    from goat_lora.cli import main

    monkeypatch.delenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", raising=False)
    regions = []
    compile_regions = accelerate.accelerator.compile_regions
    monkeypatch.setattr(
        accelerate.accelerator,
        "compile_regions",
        lambda model, **kw: regions.append(type(model).__name__) or compile_regions(model, **kw),
    )

    model_dir, data = tiny_task
    out = tmp_path / "run"
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    argv = [
        "train",
        *_flags(model_dir, data),
        "--batch-size",
        "8",
        "--report-to",
        "none",
        "--compile",
        "--compile-backend",
        "eager",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before  # it did compile
    assert regions == ["GoatModel"]  # regionally
    compiled = json.loads((out / "metrics.json").read_text())
    eager = json.loads(open(f"{one_process}/metrics.json").read())
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["compile"] is True and config["args"]["compile_backend"] == "eager"
    assert len(compiled["train_loss"]) == len(eager["train_loss"]) == 4
    for a, b in zip(compiled["train_loss"], eager["train_loss"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
        assert a["aux_loss"] == b["aux_loss"] and a["expert_balance"] == b["expert_balance"]
    assert compiled["test_accuracy"] == eager["test_accuracy"]


def test_regional_compile_of_a_decoder_compiles_its_block_a_fixed_number_of_times_whatever_the_depth():
    """Compiled block by block (accelerate's compile_regions, as `goat train --compile`), a GOAT decoder's
    block is compiled twice (the first block, whose input needs no gradient, and the others) however many
    layers there are: no guard on anything that differs per layer. With the KV cache on (transformers'
    default outside the Trainer) each block's cache slot is such a guard, so the models here, like the
    Trainer's and the benches', train without it."""
    from accelerate.utils import compile_regions

    def graphs(layers: int) -> int:
        torch._dynamo.reset()
        base = tiny_llama(num_hidden_layers=layers)
        base.config.use_cache = False
        model = get_goat_model(base, GoatConfig(r=8, num_experts=4, dropout=0.0))
        compiled, batch = compile_regions(model.train(), backend="eager"), token_batch()
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        out = compiled(**batch, labels=batch["input_ids"])
        (out.loss + model.aux_loss()).backward()
        return torch._dynamo.utils.counters["stats"]["unique_graphs"] - before

    assert graphs(4) == graphs(2)
    torch._dynamo.reset()


def test_compile_knob_passes_to_the_training_arguments(monkeypatch):
    from goat_lora.engine import trainer
    from goat_lora.settings import RunSettings

    variable = trainer.REGIONAL_VARIABLE
    monkeypatch.setattr(trainer, "_USER_REGIONAL", None)  # as if the user had not set it
    monkeypatch.delenv(variable, raising=False)
    assert trainer.compile_arguments(RunSettings()) == {}
    settings = dataclasses.replace(RunSettings(), compile=True, compile_backend="aot_eager")
    assert trainer.compile_arguments(settings) == {"torch_compile": True, "torch_compile_backend": "aot_eager"}
    assert os.environ[variable] == "True"  # accelerate's compile_regions
    # CUDA graphs: the whole model, as checked on GPUs; activation checkpointing: records re-run in backward.
    # Each run sets it anew, so a regional run before does not carry over (goat compare runs many in a process).
    trainer.compile_arguments(dataclasses.replace(settings, compile_mode="reduce-overhead"))
    assert os.environ[variable] == "False"
    trainer.compile_arguments(settings)
    trainer.compile_arguments(dataclasses.replace(settings, gradient_checkpointing=True))
    assert os.environ[variable] == "False"
    monkeypatch.setattr(trainer, "_USER_REGIONAL", "False")  # the user's choice, set before the process began
    monkeypatch.setenv(variable, "False")
    trainer.compile_arguments(settings)
    assert os.environ[variable] == "False"


def test_compile_mode_is_cuda_graphs_on_cuda_and_the_default_elsewhere():
    from goat_lora.settings import compile_mode

    assert compile_mode("auto", cuda=True) == "reduce-overhead"
    assert compile_mode("auto", cuda=False) is None  # torch's default mode
    assert compile_mode("default", cuda=True) is None
    assert compile_mode("max-autotune", cuda=False) == "max-autotune"


def test_cuda_graph_runs_pad_batches_to_a_few_shapes(monkeypatch):
    """When --compile records CUDA graphs every batch is padded to a multiple of 64 tokens (at most
    --max-length), so texts of any length give a few shapes, each one graph; otherwise (and on the CPU)
    as long as the longest text unless --pad-to-multiple says otherwise."""
    import goat_lora.engine.resolve as resolve
    from goat_lora.hf import load_tokenizer
    from goat_lora.settings import RunSettings
    from goat_lora.tasks.causal_lm import CausalLMCollator
    from goat_lora.tasks.text import TextCollator

    assert resolve.resolve_run(RunSettings(compile=True)).settings.pad_to_multiple is None  # CPU: no CUDA graphs
    monkeypatch.setattr(resolve, "_cuda", lambda: True)
    assert resolve.resolve_run(RunSettings(compile=True)).settings.pad_to_multiple == 64
    assert resolve.resolve_run(RunSettings(compile=True, compile_mode="default")).settings.pad_to_multiple is None
    assert resolve.resolve_run(RunSettings(compile=True, pad_to_multiple=8)).settings.pad_to_multiple == 8
    tokenizer = load_tokenizer("minilm")
    lengths = set()
    for words in (1, 5, 30, 70, 150, 400):
        batch = TextCollator(tokenizer, 200, pad_multiple=64)([{"input": "word " * words, "labels": 0}])
        lengths.add(batch["input_ids"].shape[1])
        assert batch["attention_mask"].shape == batch["input_ids"].shape == batch["token_type_ids"].shape
    assert lengths == {64, 128, 192, 200}
    plain = TextCollator(tokenizer, 200)([{"input": "word " * 5, "labels": 0}])
    assert plain["input_ids"].shape[1] == 7
    padded = CausalLMCollator(tokenizer, 100, pad_multiple=64)([{"input": {"text": "word " * 5, "prompt": None}}])
    assert padded["input_ids"].shape == (1, 64) and int(padded["attention_mask"].sum()) == int(
        plain["attention_mask"].sum()
    )
    assert (padded["labels"][0, int(padded["attention_mask"].sum()) :] == -100).all()


def test_compiled_training_over_mixed_lengths_compiles_a_bounded_number_of_graphs(tiny_task, tmp_path, monkeypatch):  # noqa: F811
    """`goat train --compile` over texts of 1 to 30 words: no graph break, and a bounded number of graphs
    (the padded lengths and the last, smaller batch), not one per length."""
    from test_scaleout import write_reviews

    monkeypatch.delenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", raising=False)  # --compile sets it

    from goat_lora.cli import main

    model_dir, _ = tiny_task
    data = write_reviews(tmp_path / "mixed.csv", lambda rng: rng.randint(1, 30))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    before_graphs, before_breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    argv = [
        "train",
        *_flags(model_dir, str(data)),
        "--batch-size",
        "4",
        "--max-length",
        "40",
        "--report-to",
        "none",
        "--compile",
        "--compile-backend",
        "eager",
        "--pad-to-multiple",
        "16",
        "--output",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 0
    graphs = counters["stats"]["unique_graphs"] - before_graphs
    assert sum(counters["graph_break"].values()) == before_breaks  # no graph break
    # regionally compiled: each region (the repeated block, the parts around it) for lengths 16, 32, 40 and
    # dynamo's dynamic-shape graph: 6 graphs here; one per length would be far more
    assert 1 <= graphs <= 8, graphs
