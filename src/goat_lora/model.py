"""GoatModel: a model whose target layers carry GOAT adapters, with PEFT-like conveniences."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from . import functional as F
from .checkpoint import read_adapter, save_adapter
from .config import GoatConfig
from .inject import find_modules_to_save, find_target_modules, inject_goat_layers, replace_module
from .layer import GoatLayer


def get_goat_model(model: nn.Module, config: GoatConfig) -> "GoatModel":
    """Adapt `model` in place: target layers become GoatLayers (SVD-initialised experts + router),
    every base parameter is frozen, and adapters, routers and `modules_to_save` are trainable."""
    if isinstance(model, GoatModel):
        raise ValueError("the model is already a GoatModel; call unload() first to adapt it again")
    if not isinstance(config, GoatConfig):
        raise ValueError(f"config must be a GoatConfig, got {type(config).__name__}")
    targets = find_target_modules(model, config)
    original_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    saved = find_modules_to_save(model, config)
    saved_originals = {
        name: {k: v.detach().clone() for k, v in model.get_submodule(name).state_dict().items()} for name in saved
    }
    layers = inject_goat_layers(model, config, targets)
    return GoatModel(model, config, layers, saved, saved_originals, original_requires_grad)


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
        self.goat_config = config
        self.goat_layer_names = list(layers)
        self.modules_to_save = list(modules_to_save)
        self._saved_originals = saved_originals
        self._original_requires_grad = original_requires_grad
        self._set_trainable()
        # DDP must not broadcast the layers' buffers from rank 0 at every forward: load_counts is
        # per-process bookkeeping (expert_load() sums it over processes; a broadcast replaced every
        # rank's counts with rank 0's), and init_A / init_B / expert_scale are frozen and equal on
        # every rank (broadcasting them would cost r(m + n) floats per layer per step).
        self._ddp_params_and_buffers_to_ignore = [
            f"base_model.{name}.{buffer}"
            for name in self.goat_layer_names
            for buffer in ("load_counts", "init_A", "init_B", "expert_scale")
        ]
        # Let inspect.signature(model.forward) show the base model's arguments: the transformers
        # Trainer drops dataset columns that the forward does not name.
        self.forward = functools.update_wrapper(functools.partial(GoatModel._forward, self), base_model.forward)

    # ---- forward ------------------------------------------------------------------------------
    def _forward(self, *args, **kwargs):
        mask = kwargs.get("attention_mask") if self.goat_config.aux_loss_ignore_padding else None
        layers = list(self.goat_layers())
        for layer in layers:
            layer.token_mask = mask
        try:
            return self.base_model(*args, **kwargs)
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
        losses = [F.load_balance_loss(s, layer.aux_loss_form) for s, layer in zip(stats, layers)]
        return torch.stack(losses).sum()

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
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.count_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- save / load / unload -----------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write adapter_config.json and adapter_model.safetensors (PEFT's layout), atomically."""
        save_adapter(self, save_directory)

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, adapter_directory: str | os.PathLike, is_trainable: bool = False
    ) -> "GoatModel":
        """Rebuild a saved GoatModel on a fresh copy of its base model; no SVD runs. Every check of
        the saved files against the base model passes before the model is changed."""
        saved = read_adapter(base_model, adapter_directory)
        original_requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        saved_originals = {
            name: {k: v.detach().clone() for k, v in base_model.get_submodule(name).state_dict().items()}
            for name in saved.module_states
        }
        layers = inject_goat_layers(base_model, saved.config, saved.targets, saved_factors=saved.factors)
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_A.copy_(saved.trained[name]["lora_A"])
                layer.lora_B.copy_(saved.trained[name]["lora_B"])
        for name, state in saved.module_states.items():
            base_model.get_submodule(name).load_state_dict(state, strict=True)
        model = cls(base_model, saved.config, layers, list(saved.module_states), saved_originals, original_requires_grad)
        if not is_trainable:
            for param in model.parameters():
                param.requires_grad_(False)
            model.eval()
        return model

    def unload(self) -> nn.Module:
        """Return the base model with its original weights: W_res added back to every adapted layer
        (equal to the original within the dtype's rounding), modules_to_save restored, and each
        parameter's requires_grad as it was. The GoatModel must not be used afterwards."""
        for name, layer in list(self.named_goat_layers()):
            replace_module(self.base_model, name, layer.restore_base_weight())
        for name, original in self._saved_originals.items():
            self.base_model.get_submodule(name).load_state_dict(original)
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(self._original_requires_grad.get(name, param.requires_grad))
        self.goat_layer_names = []
        return self.base_model


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
