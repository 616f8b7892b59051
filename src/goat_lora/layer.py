"""GoatLayer: a frozen base layer (Linear, GPT-2 Conv1D or 1x1 Conv2d) plus E LoRA experts and a router.

    y = (W0 - W_res) x + b + sum_j w_j(x) s_j B_j A_j dropout(x),   W_res = sum_j E[w_j] s_j B_j A_j

w(x) comes from functional.route: top-k (default), top-p, or top-k plus the always-on shared expert 0.

The base weight is rewritten once to W0 - W_res (as PiSSA rewrites it); the small initial factors
that built W_res stay as float32 buffers so that `restore_base_weight()` and checkpoint loading
rebuild W_res exactly without another SVD. Adapters and router are float32 whatever the base dtype.
`restore_base_weight()` gives W0 back bit for bit: the few entries where adding W_res back rounds to
another number are remembered at the rewrite (`_subtract_residual`). With `adapter_disabled` set
(GoatModel.disable_adapter) the layer computes the pretrained layer, W0 x + b, without routing.
Quantized bases (goat_lora.quant): with `quantize` the base becomes Q(W0 - W_res), quantized once
from float32; a base that arrives quantized keeps W0 and has W_res x subtracted at run time
(`residual_at_runtime`, `residual_forward`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import nn

from . import functional as F
from . import quant
from .config import RoutingMode

try:  # GPT-2 style layers: y = x W + b with W stored (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for plain PyTorch models
    Conv1D = None  # type: ignore[assignment,misc]

SUPPORTED_LAYER_TYPES = (
    "nn.Linear, transformers Conv1D, nn.Conv2d with a 1x1 kernel (stride 1, no padding, groups=1), "
    "bitsandbytes Linear4bit / Linear8bitLt"
)


def is_supported_layer(module: nn.Module) -> bool:
    if quant.unsupported_quantization(module) is not None:  # GPTQ, AWQ, ... (some subclass nn.Linear)
        return False
    if isinstance(module, nn.Linear):  # bitsandbytes' Linear4bit and Linear8bitLt too
        return True
    if Conv1D is not None and isinstance(module, Conv1D):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and tuple(module.kernel_size) == (1, 1)
        and tuple(module.stride) == (1, 1)
        and module.groups == 1
        and tuple(module.dilation) == (1, 1)
        # padding would grow the output beyond the tokens the experts see ("same"/"valid" pad 0 here)
        and (module.padding in ("same", "valid") or tuple(module.padding) == (0, 0))
    )


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(m, n) = (out_features, in_features) of a supported layer."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels
    return module.weight.shape[1], module.weight.shape[0]  # Conv1D stores (in, out)


def base_weight_2d(module: nn.Module) -> torch.Tensor:
    """A (m, n) view of the layer's weight W0, whatever layout the layer keeps it in; for a bitsandbytes
    layer a float32 copy of its dequantized weight."""
    if quant.is_quantized_layer(module):
        return quant.dequantized_weight(module)
    weight = module.weight
    if isinstance(module, nn.Conv2d):
        return weight.view(weight.shape[0], weight.shape[1])
    if isinstance(module, nn.Linear):
        return weight
    return weight.T  # Conv1D


def _add_to_base_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """W0 <- W0 + delta (delta (m, n) float32), computed in float32 and cast back to W0's dtype."""
    with torch.no_grad():
        view = base_weight_2d(module)
        view.copy_((view.float() + delta.to(view.device)).to(view.dtype))


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers: equal bits, not equal numbers (+0.0 and -0.0 differ)."""
    return t.view(_BITS[t.element_size()])


def _subtract_residual(module: nn.Module, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """W0 <- W0 - W_res (as _add_to_base_weight). Returns (flat positions, W0 there) of the entries where
    adding W_res back in the same arithmetic does not give W0's bits, so restoring is exact: rounding
    W0 - W_res moves an entry to another binade, or to a tie, rarely (0.64% of MiniLM's float32 weights,
    0.36% in bfloat16), so the correction costs about 1% of the adapted weights' memory. None when the
    weight is not one contiguous tensor (restoring is then exact only within rounding)."""
    weight = module.weight
    if not weight.is_contiguous():
        _add_to_base_weight(module, -residual)
        return None
    original = weight.detach().clone()
    _add_to_base_weight(module, -residual)
    with torch.no_grad():
        back = (base_weight_2d(module).float() + residual.to(weight.device)).to(weight.dtype)
        # the same (m, n) view of `original` as base_weight_2d gives, so positions compare in one layout
        back_raw = back.T if (Conv1D is not None and isinstance(module, Conv1D)) else back.reshape(weight.shape)
        wrong = (_bits(back_raw) != _bits(original)).reshape(-1).nonzero().squeeze(1)
        index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
        return wrong.to(index_dtype), original.reshape(-1)[wrong]


_FINGERPRINT_POINTS = 16


def weight_fingerprint(weight_2d: torch.Tensor) -> torch.Tensor:
    """[mean, mean |w|, 16 entries at positions fixed by the shape] in float64: cheap, and enough to
    tell one pretrained weight from another while tolerating a change of dtype."""
    w = weight_2d.detach().to(torch.float64)
    rows, cols = w.shape
    generator = torch.Generator().manual_seed(rows * 100_003 + cols)
    r = torch.randint(rows, (_FINGERPRINT_POINTS,), generator=generator)
    c = torch.randint(cols, (_FINGERPRINT_POINTS,), generator=generator)
    return torch.cat([torch.stack([w.mean(), w.abs().mean()]).cpu(), w[r.to(w.device), c.to(w.device)].cpu()])


def in_backward_recompute() -> bool:
    # Non-reentrant activation checkpointing re-runs forwards inside backward; their routing must
    # not be recorded twice (and must not replace the stats whose graph reaches the loss).
    # Under torch.compile no Python runs in backward: the compiled backward recomputes tensors only,
    # and dynamo records a checkpointed region's side effects once when
    # torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint is set (docs/design.md).
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# Which 16-bit lane of an int64 holds its top bits (int64.random_() leaves the sign bit 0).
_TOP_LANE = 3 if sys.byteorder == "little" else 0


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool mask, each element kept independently with probability about 1 - p (dropout's mask).

    On the CPU, bernoulli_ draws one random number per element from the Mersenne twister (all
    dropouts together took 17-28% of a profiled LoRA step on MiniLM). Here one 64-bit draw of
    torch's generator (63 random bits) gives four elements: three lanes of 16 uniform bits and one of
    15; an element is dropped when its lane's integer falls in the lowest round(p * 2^b) of the
    2^b values (b = 16, 15). So P(drop) = round(p * 2^b) / 2^b, within 2^-16 of p. Seeded by
    torch.manual_seed like any other draw. On other devices: bernoulli_.

    Under torch.compile the same draw, as one opaque operator (`goat_lora::keep_mask`): dynamo cannot
    trace the in-place random_ / bernoulli_, and a torch.rand that inductor lowers into the kernels
    that use the mask carries the index of its seed as a constant in their code, so compiling a whole
    model compiled those kernels once per layer (docs/benchmarks.md). Compiled and eager training draw
    the same masks for the same seed (when nothing else in the model draws random numbers in between).
    """
    if torch.compiler.is_compiling():  # a fresh empty tensor per call: AOTAutograd's CSE would merge two
        # calls with equal arguments (q, k and v of one block) into one mask; it leaves torch.empty alone
        return _keep_mask_op(torch.empty(0, device=device), list(shape), p)
    return _draw_keep_mask(shape, p, device)


def _draw_keep_mask(shape: Sequence[int], p: float, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_()  # uniform on [0, 2^63)
    lanes = words.view(torch.int16).view(-1, 4)  # three lanes uniform on [-2^15, 2^15), the top one on [0, 2^15)
    return (lanes >= _lane_thresholds(p)).view(-1)[:count].view(shape)


# Tagged as seeded random: the partitioner saves the mask for backward rather than recomputing it (a new
# draw); where activation checkpointing recomputes it, it replays the forward's generator state first.
# `draw`: an empty tensor on the mask's device, a new one for each call.
@torch.library.custom_op("goat_lora::keep_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _keep_mask_op(draw: torch.Tensor, shape: list[int], p: float) -> torch.Tensor:
    return _draw_keep_mask(shape, p, draw.device)


@_keep_mask_op.register_fake
def _(draw: torch.Tensor, shape: list[int], p: float) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.bool, device=draw.device)


_LANE_THRESHOLDS: dict[float, torch.Tensor] = {}


def _lane_thresholds(p: float) -> torch.Tensor:
    """keep_mask's four int16 thresholds for drop probability p, built once per p (two ops less per layer
    and step; nothing writes to them)."""
    if p not in _LANE_THRESHOLDS:
        thresholds = torch.full((4,), round(p * 65536) - 32768, dtype=torch.int16)
        thresholds[_TOP_LANE] = round(p * 32768)
        _LANE_THRESHOLDS[p] = thresholds
    return _LANE_THRESHOLDS[p]


class GoatLayer(nn.Module):
    """E LoRA experts (concatenated: lora_A (r, n), lora_B (m, r)) and a router around a frozen layer.

    routing "top_k" / "top_p": the router (n -> E) chooses among all experts. "shared": expert 0 is used by
    every token with weight 1 and the router (n -> E - 1) chooses top_k of experts 1..E-1.
    residual_coef: c_j in W_res = sum_j c_j s_j B_j A_j, one number for all experts or E of them
    (GoatConfig.residual_coefs: E[w_j] unless init_cof is set).
    quantize: a full-precision nn.Linear base is replaced by a bitsandbytes layer holding Q(W0 - W_res).
    A bitsandbytes base is kept as it is and W_res x is subtracted at run time (residual_at_runtime).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        factors: F.ExpertFactors,
        *,
        top_k: int,
        residual_coef: float | Sequence[float] | torch.Tensor,
        routing: str = "top_k",
        top_p: float = 0.25,
        dropout: float = 0.0,
        aux_loss_form: str = "public",
        router_weight: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        quantize: quant.QuantSpec | None = None,
    ) -> None:
        super().__init__()
        if not is_supported_layer(base_layer):
            raise ValueError(f"cannot adapt {type(base_layer).__name__}; supported: {SUPPORTED_LAYER_TYPES}")
        out_features, in_features = layer_shape(base_layer)
        total_rank, num_experts = factors.A.shape[0], factors.expert_scale.shape[0]
        if factors.A.shape != (total_rank, in_features) or factors.B.shape != (out_features, total_rank):
            raise ValueError(
                f"expert factors A {tuple(factors.A.shape)}, B {tuple(factors.B.shape)} do not fit a layer "
                f"of shape (out={out_features}, in={in_features})"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.top_k, self.expert_rank = num_experts, top_k, total_rank // num_experts
        self.routing, self.top_p = RoutingMode(routing).value, float(top_p)
        self.num_shared = 1 if self.routing == RoutingMode.SHARED.value else 0  # expert 0 when shared
        num_routed = num_experts - self.num_shared  # R: the router's outputs
        if num_routed < 1 or not 1 <= top_k <= num_routed:
            raise ValueError(
                f"routing={self.routing!r} with {num_experts} experts routes {num_routed}; top_k={top_k} must be "
                f"between 1 and {num_routed}"
            )
        coefs = torch.as_tensor(residual_coef, dtype=torch.float32)
        if coefs.numel() not in (1, num_experts):
            raise ValueError(f"residual_coef has {coefs.numel()} values; give one, or one per expert ({num_experts})")
        coefs = coefs.reshape(-1).expand(num_experts)
        self.residual_coefs = tuple(float(c) for c in coefs)  # c_j, fixed: W_res is rebuilt from them exactly
        self.aux_loss_form = aux_loss_form
        device = base_layer.weight.device

        # Trainable: experts and router, float32 even when the base is bf16/fp16.
        self.lora_A = nn.Parameter(factors.A.clone().float().to(device))  # (r, n)
        self.lora_B = nn.Parameter(factors.B.clone().float().to(device))  # (m, r)
        self.router = nn.Linear(in_features, num_routed, bias=False, device=device, dtype=torch.float32)
        if router_weight is not None:
            with torch.no_grad():
                self.router.weight.copy_(router_weight)
        else:  # nn.Linear's own init (Kaiming-uniform, a = sqrt(5)), but from our seeded (CPU) generator
            weight = torch.empty(num_routed, in_features, dtype=torch.float32)
            nn.init.kaiming_uniform_(weight, a=5**0.5, generator=generator)
            with torch.no_grad():  # drawn on the CPU, so a CUDA base layer gets the same router
                self.router.weight.copy_(weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        # Frozen: the initial factors (to rebuild W_res exactly) and the per-expert scales s_j.
        self.register_buffer("init_A", factors.A.clone().float().to(device))
        self.register_buffer("init_B", factors.B.clone().float().to(device))
        self.register_buffer("expert_scale", factors.expert_scale.clone().float().to(device))

        # Routing bookkeeping (not state): stats of the last forward, load since the last reset.
        self.token_mask: torch.Tensor | None = None  # set by GoatModel for the current forward
        self.last_stats: F.RoutingStats | None = None
        self._token_count_cache: tuple[int, torch.Tensor] | None = None  # see _token_count
        self.register_buffer(
            "load_counts", torch.zeros(num_experts, dtype=torch.float64, device=device), persistent=False
        )
        # True inside GoatModel.disable_adapter(): the forward is the pretrained layer's, nothing is recorded
        self.adapter_disabled = False
        # In eval mode without autograd (torch.no_grad, inference_mode: evaluation, generation, lm-eval, serving)
        # the layer does only the routing and the two matmuls; True inside GoatModel.recording_routing()
        # records anyway
        self.record_inference = False
        self._restore_patch: tuple[torch.Tensor, torch.Tensor] | None = None  # see subtract_residual

        # Where W_res goes (docs/design.md, "Quantized bases"). A quantized weight cannot be rewritten
        # without rounding it again, which would lose most of the small W_res: subtract W_res x at run time.
        self.residual_at_runtime = quant.is_quantized_layer(base_layer)
        self.original_fingerprint: torch.Tensor | None = None  # of W0, where the layer no longer holds it exactly
        if self.residual_at_runtime:
            if quantize is not None:
                raise ValueError(
                    f"quantize={quantize.kind!r} needs a full-precision base; this one is already "
                    f"bitsandbytes {quant.layer_quantization(base_layer)}"
                )
            self.original_fingerprint = weight_fingerprint(base_weight_2d(base_layer))
            quant.keep_reference_cpu_path(base_layer)
        elif quantize is not None:  # QPiSSA's order: Q(W0 - W_res), quantized once from float32
            if type(base_layer) is not nn.Linear:
                raise ValueError(
                    f"quantize={quantize.kind!r}: bitsandbytes quantizes nn.Linear layers; this layer "
                    f"is a {type(base_layer).__name__}"
                )
            weight = base_layer.weight
            self.original_fingerprint = weight_fingerprint(weight)
            target = weight.detach().float() - self.residual()  # W0 - W_res in float32
            self.base_layer = quant.quantize_linear(target, base_layer.bias, quantize, compute_dtype=weight.dtype)
        else:
            self.subtract_residual()  # W0 <- W0 - W_res

    # Bookkeeping that a whole-module cast (module.half(), module.bfloat16(), DeepSpeed's bf16 engine)
    # must not round: the float64 expert-load counts (bf16 holds integers exactly only up to 256) and
    # the float32 initial factors and scales that rebuild W_res for unload() and checkpoints.
    _KEEP_DTYPE = ("init_A", "init_B", "expert_scale", "load_counts")

    def _apply(self, fn, recurse: bool = True):
        kept = {name: self._buffers[name] for name in self._KEEP_DTYPE}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():  # follow the move to another device, keep the dtype
            self._buffers[name] = tensor.to(self._buffers[name].device)
        return self

    # ---- the math ---------------------------------------------------------------------------
    def residual(self) -> torch.Tensor:
        """W_res = sum_j c_j s_j B_j A_j from the frozen initial factors (m, n), float32."""
        factors = F.ExpertFactors(self.init_A, self.init_B, self.expert_scale)
        return F.residual_weight(factors, torch.tensor(self.residual_coefs))

    def residual_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """W_res x for tokens (T, n) -> (T, m), float32, without forming W_res: the frozen initial factors
        in the experts' two rank-r matmuls, every expert at its weight c_j (functional.experts_delta).
        What a base that arrived quantized subtracts at run time; a caller that wants the pretrained
        output from a layer whose base holds W0 - W_res adds it back."""
        coefs = tokens.new_tensor(self.residual_coefs, dtype=torch.float32)  # (E,)
        weights = coefs.expand(tokens.shape[0], -1)  # (T, E): c_j for every token
        return F.experts_delta(tokens.float(), self.init_A, self.init_B, weights, self.expert_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_disabled:
            return self._pretrained_forward(x)
        return self._adapted_forward(x, per_expert_loop=False)

    def _pretrained_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x + b as (W0 - W_res) x + b + W_res x, within the base dtype's rounding of the pretrained
        layer (on a base GOAT quantized: Q(W0 - W_res) x + b + W_res x; on one that arrived quantized: its own
        output). The weights are not touched: an autograd graph built before (the policy's forward of a
        DPO step) still holds them. No routing, so no statistics and no load are recorded."""
        result = self.base_layer(x)
        if self.residual_at_runtime:  # the base still holds W0
            return result
        tokens = self._to_tokens(x)
        return result + self._from_tokens(self.residual_forward(tokens), result).to(result.dtype)

    def forward_loop_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer with a per-expert Python loop (slow; used to check the batched path)."""
        return self._adapted_forward(x, per_expert_loop=True)

    def _adapted_forward(self, x: torch.Tensor, per_expert_loop: bool) -> torch.Tensor:
        result = self.base_layer(x)  # (W0 - W_res) x + b; W0 x + b when the residual is applied at run time
        tokens = self._to_tokens(x).to(self.lora_A.dtype)  # (T, n)
        keep, dropout_scale = self._experts_dropout(tokens)
        # dropout(x) = (x * keep) / (1 - p), and 1 / (1 - p) commutes with A_j and B_j: it is folded into
        # the per-expert scales (E numbers) instead of multiplying the (T, n) input forward and backward
        expert_scale = self.expert_scale if keep is None else self.expert_scale * dropout_scale
        # inference (eval mode without autograd) records nothing; a training-mode forward without autograd
        # (reentrant activation checkpointing) still records, so aux_loss() can refuse its missing gradient
        record = self.training or torch.is_grad_enabled() or self.record_inference
        routing = None
        if not record and not per_expert_loop and self.routing != RoutingMode.TOP_P.value:
            # nothing needs the routing or a gradient: the same delta in fewer ops (docs/design.md)
            delta = F.routed_experts_inference(
                tokens, self.router.weight, self.lora_A, self.lora_B, expert_scale, self.top_k
            )
        elif per_expert_loop:  # the reference: routing, then a Python loop over experts, autograd throughout
            with torch.autocast(tokens.device.type, enabled=False):  # float32 logits, as softmax takes them
                logits = self.router(tokens)  # (T, R)
            routing = F.route(logits, self.top_k, self.routing, self.top_p)
            kept = tokens if keep is None else tokens * keep
            delta = F.experts_delta_loop(kept, self.lora_A, self.lora_B, routing, expert_scale)
        else:  # router and all experts in one autograd node (three matmuls), in the adapters' dtype
            delta, routing = F.routed_experts(
                tokens,
                self.router.weight,
                self.lora_A,
                self.lora_B,
                expert_scale,
                keep,
                self.top_k,
                self.routing,
                self.top_p,
            )
        if self.residual_at_runtime:  # - W_res x, on the undropped input: it belongs to the frozen base
            delta = delta - self.residual_forward(tokens)
        if record:
            self._record(routing, x)
        else:  # aux_loss() is then 0 rather than a stale training value
            self.last_stats = None
        return result + self._from_tokens(delta, result).to(result.dtype)

    def _experts_dropout(self, tokens: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """(keep, 1 / (1 - p)): the experts' dropout mask, keep ~ Bernoulli(1 - p) elementwise
        (keep_mask), or None when there is no dropout; the caller folds the scale into the expert
        scales and multiplies the input by the 0/1 mask inside A's projection, so that autograd keeps
        the 1-byte mask beside the tokens the router keeps alive anyway, not a float copy: GOAT's
        activation memory stays at LoRA's."""
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        if not self.training or p == 0.0:
            return None, 1.0
        return keep_mask(tokens.shape, p, tokens.device), 1.0 / (1.0 - p)

    # ---- layout plumbing --------------------------------------------------------------------
    def _to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base_layer, nn.Conv2d):  # (B, C, H, W) -> (B*H*W, C)
            return x.movedim(1, -1).reshape(-1, self.in_features)
        return x.reshape(-1, self.in_features)

    def _from_tokens(self, delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base_layer, nn.Conv2d):  # (B*H*W, C') -> (B, C', H, W)
            batch, _, height, width = like.shape
            return delta.reshape(batch, height, width, self.out_features).movedim(-1, 1)
        return delta.reshape(like.shape)

    def _token_count(self, probs: torch.Tensor) -> torch.Tensor:
        """T as a () float32 tensor on probs' device, kept while the batch size stays the same (one op less per
        layer and step; nothing writes to it). Compiled, a fill in the graph (inductor fuses it)."""
        tokens = probs.shape[0]
        if torch.compiler.is_compiling():
            return torch.full((), float(tokens), device=probs.device)
        cached = self._token_count_cache
        if cached is None or cached[0] != tokens or cached[1].device != probs.device:
            cached = self._token_count_cache = (tokens, torch.full((), float(tokens), device=probs.device))
        return cached[1]

    def _record(self, routing: F.Routing, x: torch.Tensor) -> None:
        if in_backward_recompute():
            return
        mask = None
        if self.token_mask is not None and not isinstance(self.base_layer, nn.Conv2d):
            if tuple(self.token_mask.shape) == tuple(x.shape[:-1]):
                mask = self.token_mask.reshape(-1).to(torch.bool)
        if mask is None or torch.compiler.is_compiling():
            stats = F.routing_stats(routing, mask, self._token_count(routing.probs))
        else:
            # The masked sums save the mask for backward. Non-reentrant checkpointing requires its recompute
            # (which records nothing) to save as many tensors as the forward did: under hooks of our own the
            # mask is kept outside the checkpoint's count.
            with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
                stats = F.routing_stats(routing, mask)
        self.last_stats = stats
        # the load over all E experts, for expert_load(), in one in-place add (float32 counts into the float64
        # buffer: add_ promotes, no cast of its own); the shared expert serves every counted token
        if self.num_shared:
            self.load_counts[: self.num_shared].add_(stats.num_tokens)
            self.load_counts[self.num_shared :].add_(stats.counts.detach())
        else:
            self.load_counts.add_(stats.counts.detach())

    # ---- bookkeeping --------------------------------------------------------------------------
    def aux_loss(self) -> torch.Tensor:
        """This layer's load-balancing loss for its last forward (0 before any forward)."""
        if self.last_stats is None:
            return self.lora_A.new_zeros(())
        return F.load_balance_loss(self.last_stats, self.aux_loss_form)

    def expert_load(self) -> torch.Tensor:
        """Fraction of all expert uses (token, expert) that went to each expert since the last reset (E,);
        a shared expert is used by every token (with top-k it gets 1/(k+1))."""
        total = self.load_counts.sum()
        return self.load_counts / total if total > 0 else self.load_counts.clone()

    def reset_expert_load(self) -> None:
        self.load_counts.zero_()

    def subtract_residual(self) -> None:
        """W0 <- W0 - W_res in the base layer (done at construction; again after restore_base_weight, with the
        same bits). Keeps what restore_base_weight needs to give W0's exact bits back: a plain attribute, not
        a buffer, since it is neither state to save nor something DDP should broadcast. A quantized base is
        never rewritten (restore_base_weight leaves it as it is, so this does nothing there)."""
        if quant.is_quantized_layer(self.base_layer):
            return
        self._restore_patch = _subtract_residual(self.base_layer, self.residual())

    def restore_base_weight(self) -> nn.Module:
        """The base layer with W_res back in it where that is exact; return it.

        Full precision: W0 bit for bit (the entries that rounding would change are written from the patch
        kept at the rewrite); once per subtract_residual. A base that arrived
        quantized: returned untouched (it never held W_res), the same codes bit for bit. A base GOAT
        quantized itself: returned as it is, Q(W0 - W_res), a quantization of W0 as good as Q(W0) for
        4-bit (W_res is far below 4-bit resolution, docs/design.md); adding W_res back would need a
        second rounding that loses it again, and the full-precision W0 is not kept."""
        if quant.is_quantized_layer(self.base_layer):
            return self.base_layer
        _add_to_base_weight(self.base_layer, self.residual())
        if self._restore_patch is not None:  # the entries whose rounding differs, written back exactly
            index, values = self._restore_patch
            weight = self.base_layer.weight
            with torch.no_grad():
                weight.view(-1)[index.to(weight.device).long()] = values.to(weight.device, weight.dtype)
            self._restore_patch = None
        return self.base_layer

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
            f"routing={self.routing}, top_k={self.top_k}, top_p={self.top_p:g}, rank_per_expert={self.expert_rank}, "
            f"residual_coefs=({', '.join(f'{c:g}' for c in self.residual_coefs)})"
            + (", residual_at_runtime=True" if self.residual_at_runtime else "")
        )
