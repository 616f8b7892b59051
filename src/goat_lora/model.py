"""GoatModel: a model whose target layers carry GOAT adapters, with PEFT-like conveniences.

Several adapters on one base (`add_adapter`, `load_adapter`, `set_adapter`, `delete_adapter`): the layers
hold the active adapter only. An inactive adapter is kept as the tensors its checkpoint holds (a
`SavedAdapter`), and switching unloads the active one (the base weights come back bit for bit, see
GoatLayer.restore_base_weight) and adapts the base again from the other's tensors, the very operations
`from_pretrained` runs on a fresh base. So switching gives the logits of loading that adapter alone,
bit for bit, and no sequence of switches drifts the base weights.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from . import functional as F
from .checkpoint import SavedAdapter, read_adapter, save_adapter
from .config import GoatConfig
from .inject import find_modules_to_save, find_target_modules, inject_goat_layers, replace_module
from .layer import GoatLayer

DEFAULT_ADAPTER = "default"  # peft's name for the first adapter


def get_goat_model(model: nn.Module, config: GoatConfig) -> "GoatModel":
    """Adapt `model` in place: target layers become GoatLayers (SVD-initialised experts + router),
    every base parameter is frozen, and adapters, routers and `modules_to_save` are trainable."""
    if isinstance(model, GoatModel):
        raise ValueError("the model is already a GoatModel; call unload() first to adapt it again")
    if not isinstance(config, GoatConfig):
        raise ValueError(f"config must be a GoatConfig, got {type(config).__name__}")
    return GoatModel(model, *adapt_in_place(model, config))


class Adapted(NamedTuple):
    """One adapter put onto a base model: what GoatModel needs to know about it."""

    config: GoatConfig
    layers: dict[str, GoatLayer]
    modules_to_save: list[str]
    saved_originals: dict[str, dict[str, torch.Tensor]]  # modules_to_save -> their state before adapting
    original_requires_grad: dict[str, bool]


def adapt_in_place(model: nn.Module, config: GoatConfig, saved: SavedAdapter | None = None) -> Adapted:
    """Adapt `model` in place, from the SVD of its weights (`saved` None) or from a saved adapter's tensors
    (read from disk by read_adapter, or kept in memory by a GoatModel): then no SVD runs."""
    targets = find_target_modules(model, config) if saved is None else saved.targets
    original_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    to_save = find_modules_to_save(model, config) if saved is None else list(saved.module_states)
    saved_originals = {
        name: {k: v.detach().clone() for k, v in model.get_submodule(name).state_dict().items()} for name in to_save
    }
    layers = inject_goat_layers(model, config, targets, saved_factors=None if saved is None else saved.factors)
    if saved is not None:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_A.copy_(saved.trained[name]["lora_A"])
                layer.lora_B.copy_(saved.trained[name]["lora_B"])
        for name, state in saved.module_states.items():
            model.get_submodule(name).load_state_dict(state, strict=True)
    return Adapted(config, layers, to_save, saved_originals, original_requires_grad)


class GoatModel(nn.Module):
    """Wraps a model adapted by `get_goat_model`. Its forward is the base model's forward (same
    arguments, same outputs), so a transformers model keeps `labels=` -> `.loss` and `generate()`.

    The training loop adds the balance loss itself, where a reader can see it:
        loss = outputs.loss + model.goat_config.aux_loss_coef * model.aux_loss()
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: GoatConfig,
        layers: dict[str, GoatLayer],
        modules_to_save: list[str],
        saved_originals: dict[str, dict[str, torch.Tensor]],
        original_requires_grad: dict[str, bool],
    ) -> None:
        super().__init__()
        self.base_model = base_model
        self.active_adapter = DEFAULT_ADAPTER
        self._inactive: dict[str, _Parked] = {}  # the other adapters, taken off the base (_park)
        self._frozen = False  # from_pretrained(is_trainable=False): every adapter is loaded frozen
        self._disabled = False  # inside disable_adapter()
        self._attach(Adapted(config, layers, modules_to_save, saved_originals, original_requires_grad))
        # Let inspect.signature(model.forward) show the base model's arguments: the transformers
        # Trainer drops dataset columns that the forward does not name.
        self.forward = functools.update_wrapper(functools.partial(GoatModel._forward, self), base_model.forward)

    def _attach(self, adapted: Adapted) -> None:
        """Take `adapted` (just put onto self.base_model) as the active adapter."""
        self._active = adapted
        self.goat_config = adapted.config
        self.goat_layer_names = list(adapted.layers)
        self.modules_to_save = list(adapted.modules_to_save)
        self._saved_originals = adapted.saved_originals
        self._original_requires_grad = adapted.original_requires_grad
        self._set_trainable()
        if self._frozen:
            for param in self.base_model.parameters():
                param.requires_grad_(False)
        for layer in adapted.layers.values():  # new layers follow the wrapper's train / eval mode (dropout)
            layer.train(self.training)
        # DDP must not broadcast the layers' buffers from rank 0 at every forward: load_counts is
        # per-process bookkeeping (expert_load() sums it over processes; a broadcast replaced every
        # rank's counts with rank 0's), and init_A / init_B / expert_scale are frozen and equal on
        # every rank (broadcasting them would cost r(m + n) floats per layer per step).
        self._ddp_params_and_buffers_to_ignore = [
            f"base_model.{name}.{buffer}"
            for name in self.goat_layer_names
            for buffer in ("load_counts", "init_A", "init_B", "expert_scale")
        ]

    # ---- forward ------------------------------------------------------------------------------
    def _forward(self, *args, **kwargs):
        with self.padding_mask(kwargs.get("attention_mask")):
            return self.base_model(*args, **kwargs)

    @contextlib.contextmanager
    def padding_mask(self, attention_mask: torch.Tensor | None):
        """Inside: the balance loss skips padding tokens (with aux_loss_ignore_padding). The forward sets
        it; code that calls the wrapped model directly (TRL's trainers, peft's PeftModel) uses this."""
        mask = attention_mask if self.goat_config.aux_loss_ignore_padding else None
        layers = list(self.goat_layers())
        for layer in layers:
            layer.token_mask = mask
        try:
            yield
        finally:
            for layer in layers:
                layer.token_mask = None

    def forward(self, *args, **kwargs):  # replaced per instance in __init__ (see there)
        return self._forward(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """The transformers method, refusing reentrant checkpointing: it runs the forward without
        autograd, so the load-balancing loss would silently stop reaching the routers."""
        checkpoint_kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if checkpoint_kwargs["use_reentrant"]:
            raise ValueError(
                "use_reentrant=True is not allowed with GOAT: the load-balancing loss would lose its gradient; "
                "use use_reentrant=False"
            )
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is None:  # transformers < 5
            result = self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
        else:
            result = enable(activation_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
        # transformers also hooks requires_grad_(True) onto the embeddings' output, which only reentrant
        # checkpointing needs; under torch.compile that call on an intermediate stops the graph
        disable = getattr(self.base_model, "disable_input_require_grads", None)
        if disable is not None:
            disable()
        return result

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """Older name of activation_checkpointing_enable (same checks)."""
        return self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def __getattr__(self, name: str):
        # Attributes the wrapper does not have (config, device, gradient_checkpointing_enable, ...)
        # come from the base model, so code written for the transformers model keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---- GOAT specifics -----------------------------------------------------------------------
    def goat_layers(self) -> Iterator[GoatLayer]:
        for name in self.goat_layer_names:
            yield self.base_model.get_submodule(name)

    def named_goat_layers(self) -> Iterator[tuple[str, GoatLayer]]:
        for name in self.goat_layer_names:
            yield name, self.base_model.get_submodule(name)

    def aux_loss(self, sync_processes: bool = True) -> torch.Tensor:
        """Load-balancing loss of the last forward, summed over adapted layers; differentiable and
        unscaled (multiply by config.aux_loss_coef). Form: config.aux_loss_form ("public": the
        public code's R * sum_j (count_j/T) P_j per layer over the R routed experts, equal to top_k at
        perfect balance; see functional.load_balance_loss for top_p and the shared expert).

        Under torch.distributed (DDP, FSDP) the routing statistics are summed over processes first,
        so the loss is that of the global batch, as in a single-process run: the probability sums
        go through a differentiable all-reduce (its backward sums the gradients of all processes,
        which DDP's averaging turns back into the global batch's gradient)."""
        layers = list(self.goat_layers())
        stats = [layer.last_stats for layer in layers]
        if any(s is None for s in stats):
            if all(s is None for s in stats):
                return torch.zeros((), device=layers[0].lora_A.device)
            raise RuntimeError("some adapted layers saw no input in the last forward; aux_loss() needs all of them")
        if torch.is_grad_enabled() and any(l.router.weight.requires_grad for l in layers):
            if not any(s.prob_sum.requires_grad for s in stats):
                raise RuntimeError(
                    "the load-balancing loss has no gradient: the forward ran without autograd, e.g. under "
                    "reentrant activation checkpointing; use use_reentrant=False (the transformers default)"
                )
        if sync_processes and _distributed():
            stats = _all_reduce_stats(stats)
        forms = {(layer.aux_loss_form, s.prob_sum.shape) for s, layer in zip(stats, layers)}
        if len(forms) == 1:  # one form and expert count (one config): every layer's loss in one set of ops
            stacked = F.RoutingStats(*(torch.stack(parts) for parts in zip(*stats)))
            return F.load_balance_loss(stacked, layers[0].aux_loss_form).sum()
        return torch.stack([F.load_balance_loss(s, layer.aux_loss_form) for s, layer in zip(stats, layers)]).sum()

    def expert_load(self, sync_processes: bool = True) -> dict[str, torch.Tensor]:
        """Per adapted layer: fraction of expert uses per expert since the last reset, (E,) each, a shared
        expert included (it serves every token); counted over all processes under torch.distributed."""
        names = list(self.goat_layer_names)
        counts = [layer.load_counts for layer in self.goat_layers()]
        if not counts:
            return {}
        stacked = torch.stack(counts)  # (L, E)
        if sync_processes and _distributed():
            stacked = stacked.clone()
            dist.all_reduce(stacked)
        totals = stacked.sum(dim=1, keepdim=True)
        fractions = torch.where(totals > 0, stacked / totals.clamp_min(1), stacked)
        return dict(zip(names, fractions.unbind(0)))

    def reset_expert_load(self) -> None:
        for layer in self.goat_layers():
            layer.reset_expert_load()

    @contextlib.contextmanager
    def recording_routing(self):
        """Inside, eval-mode forwards without autograd (torch.no_grad, inference_mode) record routing
        statistics and expert load as training forwards do: `goat eval` and the run's test pass report the experts'
        load this way. Outside, inference does only the routing and the two matmuls of each layer."""
        layers = list(self.goat_layers())
        before = [layer.record_inference for layer in layers]
        for layer in layers:
            layer.record_inference = True
        try:
            yield self
        finally:
            for layer, value in zip(layers, before):
                layer.record_inference = value

    # ---- parameters ---------------------------------------------------------------------------
    def _set_trainable(self) -> None:
        for param in self.base_model.parameters():
            param.requires_grad_(False)
        for layer in self.goat_layers():
            for param in (layer.lora_A, layer.lora_B, layer.router.weight):
                param.requires_grad_(True)
        for name in self.modules_to_save:
            for param in self.base_model.get_submodule(name).parameters():
                param.requires_grad_(True)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs: each layer's adapters, router, initial factors and scales, and
        the modules_to_save; keys are relative to the base model."""
        state = {}
        for name, layer in self.named_goat_layers():
            for key, value in layer.state_dict().items():
                if not key.startswith("base_layer."):  # the frozen base comes from the base model
                    state[f"{name}.{key}"] = value
        for name in self.modules_to_save:
            for key, value in self.base_model.get_submodule(name).state_dict().items():
                state[f"{name}.{key}"] = value
        return {k: v.detach() for k, v in state.items()}

    def count_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameters."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.count_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ---- save / load / unload -----------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """Write adapter_config.json and adapter_model.safetensors (PEFT's layout), atomically: the active
        adapter into `save_directory`; with `selected_adapters`, each of them, "default" into
        `save_directory` and any other into `save_directory/<name>` (peft's layout for several adapters)."""
        if selected_adapters is None:
            save_adapter(self, save_directory)
            return
        for name in selected_adapters:
            self._check_adapter(name)
        active = self.active_adapter
        try:
            for name in selected_adapters:  # saving reads the layers, so each one in turn becomes active
                self.set_adapter(name)
                save_adapter(self, save_directory if name == DEFAULT_ADAPTER else os.path.join(save_directory, name))
        finally:
            self.set_adapter(active)

    @classmethod
    def from_pretrained(
        cls,
        base_model: nn.Module,
        adapter_directory: str | os.PathLike,
        is_trainable: bool = False,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> "GoatModel":
        """Rebuild a saved GoatModel on a fresh copy of its base model; no SVD runs. Every check of
        the saved files against the base model passes before the model is changed."""
        _check_name(adapter_name)
        saved = read_adapter(base_model, adapter_directory)
        model = cls(base_model, *adapt_in_place(base_model, saved.config, saved))
        model.active_adapter = adapter_name
        if not is_trainable:
            model._freeze()
        return model

    def _freeze(self) -> None:
        """Every parameter frozen and eval mode, also for adapters activated later (inference only)."""
        self._frozen = True
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()

    def unload(self) -> nn.Module:
        """Return the base model with its original weights, bit for bit (W_res added back, the entries that
        rounding would change written from the patch kept at adapting), modules_to_save restored, and each
        parameter's requires_grad as it was. Inactive adapters are dropped. The GoatModel must not be used
        afterwards. Quantized bases (GoatLayer.restore_base_weight): a base that arrived quantized comes back
        as the same layers, bit for bit; layers GOAT quantized itself (GoatConfig.quantize) come back as the
        bitsandbytes layers holding Q(W0 - W_res), frozen: a quantization of W0, not W0."""
        self._refuse_inside_disable("unload()")
        self._park()
        self._inactive.clear()
        return self.base_model

    # ---- several adapters on one base ----------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """The adapters' names, the active one first."""
        return [self.active_adapter, *self._inactive]

    @property
    def active_adapters(self) -> list[str]:
        """peft's spelling: one adapter is active at a time."""
        return [self.active_adapter]

    def add_adapter(self, adapter_name: str, config: GoatConfig) -> None:
        """A new adapter, initialised from the original weights' SVD as get_goat_model(base, config) would
        (the same factors and router). It is kept inactive, as in peft: set_adapter(adapter_name) makes it
        the one that runs and trains."""
        self._check_new_adapter(adapter_name)
        if not isinstance(config, GoatConfig):
            raise ValueError(f"config must be a GoatConfig, got {type(config).__name__}")
        if config.quantize is not None:
            raise ValueError(
                f"an added adapter cannot quantize the shared base (quantize={config.quantize!r}); "
                "load the model quantized (BitsAndBytesConfig) instead"
            )
        active = self._park()
        try:
            self._inactive[adapter_name] = self._park(adapt_in_place(self.base_model, config))
        finally:
            self._unpark(active)

    def load_adapter(self, adapter_directory: str | os.PathLike, adapter_name: str) -> None:
        """Load a saved adapter beside the active one, inactive (as peft does); no SVD runs. Its files are
        checked against the original base weights (as from_pretrained does) before anything is kept."""
        self._check_new_adapter(adapter_name)
        active = self._park()
        try:
            saved = read_adapter(self.base_model, adapter_directory)
            if saved.config.quantize is not None:
                raise ValueError(
                    f"adapter {adapter_directory} quantizes its base itself (quantize={saved.config.quantize!r}) "
                    "and cannot share one; load it alone with GoatModel.from_pretrained"
                )
            self._inactive[adapter_name] = self._park(adapt_in_place(self.base_model, saved.config, saved))
        finally:
            self._unpark(active)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter that runs and trains: the base weights are those of loading it
        alone, bit for bit. Its parameters are the same objects as before it was set aside, so an optimizer
        built over them keeps working; the other adapters' parameters leave the model (and requires_grad)."""
        self._check_adapter(adapter_name)
        if adapter_name == self.active_adapter:
            return
        self._refuse_inside_disable("set_adapter()")
        parked = self._inactive.pop(adapter_name)
        self._inactive[self.active_adapter] = self._park()
        self._unpark(parked)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Forget an inactive adapter (set another one active first to delete the active one)."""
        self._check_adapter(adapter_name)
        if adapter_name == self.active_adapter:
            raise ValueError(
                f"adapter {adapter_name!r} is active; set_adapter() another one first (unload() removes them all)"
            )
        del self._inactive[adapter_name]

    def _park(self, adapted: Adapted | None = None) -> _Parked:
        """Take an adapter (by default the active one) off the base: its layers give back W0 bit for bit and
        leave the model, its modules_to_save return to their original state and requires_grad is restored.
        What it returns puts the adapter back exactly (_unpark)."""
        if adapted is None:
            adapted = self._active
            self._active = Adapted(self.goat_config, {}, [], {}, {})
            self.goat_layer_names, self.modules_to_save = [], []
        for name, layer in adapted.layers.items():
            replace_module(self.base_model, name, layer.restore_base_weight())
        states = {}
        for name, original in adapted.saved_originals.items():
            module = self.base_model.get_submodule(name)
            states[name] = {k: v.detach().clone() for k, v in module.state_dict().items()}
            module.load_state_dict(original)
        for name, param in self.base_model.named_parameters():
            if param.is_floating_point():  # quantized codes cannot require gradients
                param.requires_grad_(adapted.original_requires_grad.get(name, param.requires_grad))
        return _Parked(adapted, states)

    def _unpark(self, parked: _Parked) -> None:
        """Put a parked adapter back as the active one: the same layer objects, the same bits of W0 - W_res."""
        adapted = parked.adapted
        for name, layer in adapted.layers.items():
            layer.to(layer.base_layer.weight.device)  # the model may have moved while it was parked
            layer.subtract_residual()
            replace_module(self.base_model, name, layer)
        for name, state in parked.module_states.items():
            self.base_model.get_submodule(name).load_state_dict(state)
        self._attach(adapted)

    def _check_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.adapters:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has {self.adapters}")

    def _check_new_adapter(self, adapter_name: str) -> None:
        _check_name(adapter_name)
        if adapter_name in self.adapters:
            raise ValueError(
                f"an adapter named {adapter_name!r} exists already ({self.adapters}); delete_adapter() it first"
            )
        self._refuse_inside_disable("adding an adapter")
        if self.goat_config.quantize is not None:  # its layers hold Q(W0 - W_res): W0 cannot be given back
            raise ValueError(
                f"adapter {self.active_adapter!r} quantized the base itself (quantize="
                f"{self.goat_config.quantize!r}), so the base cannot be shared; load the model quantized "
                "(BitsAndBytesConfig) to give it several adapters"
            )

    # ---- the pretrained model, for a reference forward -----------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside: the pretrained model, e.g. the frozen reference of a DPO step or a KL penalty. Every
        GoatLayer computes (W0 - W_res) x + b + W_res x (W_res x a rank-r product from the frozen initial
        factors), so outputs equal the base model's within the base dtype's rounding; the weights are not
        rewritten, because the autograd graph of an earlier forward (the policy's) holds them. No routing
        runs, so the balance loss and expert load keep what the last adapted forward recorded;
        modules_to_save are replaced by frozen copies in their original state (one transient copy each);
        gradients are off. On exit the model is exactly the adapted one again (nothing was changed)."""
        if self._disabled:  # nested: already the pretrained model
            with torch.no_grad():
                yield
            return
        layers = list(self.goat_layers())
        trained = {}
        for name in self.modules_to_save:
            module = self.base_model.get_submodule(name)
            original = copy.deepcopy(module)
            original.load_state_dict(self._saved_originals[name], assign=True)  # shares the kept tensors
            original.requires_grad_(False)
            replace_module(self.base_model, name, original)
            trained[name] = module
        self._disabled = True
        for layer in layers:
            layer.adapter_disabled = True
        try:
            with torch.no_grad():
                yield
        finally:
            for layer in layers:
                layer.adapter_disabled = False
            for name, module in trained.items():
                replace_module(self.base_model, name, module)
            self._disabled = False

    def _refuse_inside_disable(self, what: str) -> None:
        if self._disabled:
            raise RuntimeError(f"{what} is not allowed inside disable_adapter(); leave the context first")


class _Parked(NamedTuple):
    """An adapter taken off the base model: its layers (holding their tensors) and its modules_to_save's
    trained state. Memory: the adapter's checkpoint tensors, 2 r (m + n) + R n + E float32 per layer."""

    adapted: Adapted
    module_states: dict[str, dict[str, torch.Tensor]]


def _check_name(adapter_name: str) -> None:
    # "/" or "." would break save_pretrained's sub-folder layout (and peft's state-dict keys)
    if not isinstance(adapter_name, str) or not adapter_name or any(c in adapter_name for c in "/\\."):
        raise ValueError(f"adapter name {adapter_name!r} must be a non-empty string without '/', '\\' or '.'")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_stats(stats: list[F.RoutingStats]) -> list[F.RoutingStats]:
    """Sum every layer's routing statistics over processes, in two collectives for all layers."""
    prob_sums = _SumOverProcesses.apply(torch.stack([s.prob_sum for s in stats]))  # (L, E)
    counts = torch.stack([torch.cat([s.counts, s.num_tokens.reshape(1)]) for s in stats]).detach().clone()
    dist.all_reduce(counts)  # (L, E + 1): counts and the token count, no gradient needed
    return [F.RoutingStats(p, c[:-1], c[-1]) for p, c in zip(prob_sums.unbind(0), counts.unbind(0))]


class _SumOverProcesses(torch.autograd.Function):
    """y = sum over processes of x; the gradient of every process's x is the sum of all processes'
    gradients of y (each process's loss depends on every process's x through y)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of any module, each tensor counted once (tied weights too)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
