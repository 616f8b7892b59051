"""The initialisation benchmark: the exact SVD per matrix against this project's route on one
LLaMA-2-7B-shaped layer, each route judged against a float64 SVD."""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
from torch import nn

from .common import INIT_TARGET, LLAMA7B_LAYER, timed, timing_stats


def format_init_table(figures: dict) -> str:
    from ..svd import TWO_STAGE_MIN_SIZE

    lines = [
        f"initialisation of one LLaMA-2-7B-shaped layer ({figures['shapes']}), r={figures['rank']} "
        f"E={figures['experts']} (d={figures['expert_rank']}), device {figures['device']}, "
        f"median of {figures['repeats']} run(s)",
        f"{'method':<34} {'seconds':>9} {'speed-up':>9}",
    ]
    exact = figures["exact_s"]["median"]
    for key, label in (
        ("exact_s", "exact float32 SVD per matrix"),
        ("fast_s", f"this project ({figures['fast_method']})"),
    ):
        seconds = figures[key]["median"]
        lines.append(f"{label:<34} {seconds:>9.2f} {exact / seconds:>8.2f}x")
    verdict = "met" if figures["speedup"] >= INIT_TARGET else "MISSED"
    lines.append(f"  speed-up {figures['speedup']:.2f}x (target >= {INIT_TARGET:.1f}x)  {verdict}")
    q = figures["quality"]
    lines.append(
        f"  experts' subspaces vs a float64 SVD over {q['experts_compared']} experts: largest principal angle "
        f"{q['max_angle_deg']:.3g} deg (median {q['median_angle_deg']:.3g}) for this project, "
        f"{q['exact_max_angle_deg']:.3g} deg (median {q['exact_median_angle_deg']:.3g}) for the exact route; "
        f"relative error of s*B_j*A_j against the exact route max {q['max_rel_error']:.2e} "
        f"(median {q['median_rel_error']:.2e}); alignment |W_eff - W0|/|W0| max {q['max_alignment_error']:.1e}"
    )
    for name, layer in q["per_layer"].items():
        lines.append(
            f"    {name:<10} max angle {layer['max_angle_deg']:.3g} deg "
            f"(exact route {layer['exact_max_angle_deg']:.3g}), max rel. error {layer['max_rel_error']:.2e}"
        )
    m = figures["largest_matrix"]
    verdict = "met" if m["speedup"] >= INIT_TARGET else "MISSED"
    lines.append(
        f"largest matrix alone ({m['name']} {m['shape']}): exact {m['exact_s']['median']:.2f} s, this project "
        f"{m['fast_s']['median']:.2f} s, speed-up {m['speedup']:.2f}x (target >= {INIT_TARGET:.1f}x)  {verdict}"
    )
    if "floor_s" in m:
        steps = ("gram_product", "band_reduction", "band_eigenvalues", "sytrd")
        seconds = {step: m[f"{step}_s"]["median"] for step in steps}
        lines.append(
            f"  floor of the Gram route: Gram product {seconds['gram_product']:.2f} s + band reduction "
            f"{seconds['band_reduction']:.2f} s + band eigenvalues {seconds['band_eigenvalues']:.2f} s = "
            f"{m['floor_s']:.2f} s, {m['floor_share']:.0%} of the route; exact / floor = "
            f"{m['floor_speedup']:.2f}x"
        )
        lines.append(
            f"  one-stage route (LAPACK sytrd {seconds['sytrd']:.2f} s; the route below h = "
            f"{TWO_STAGE_MIN_SIZE}): {m['one_stage_s']['median']:.2f} s, "
            f"speed-up {m['one_stage_speedup']:.2f}x"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# initialisation benchmark
# ------------------------------------------------------------------------------------------------


class LayerBlock(nn.Module):
    """The adapted matrices of one decoder layer, as plain Linear layers (random weights)."""

    def __init__(self, shapes: tuple, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        for name, out_features, in_features in shapes:
            layer = nn.Linear(in_features, out_features, bias=False)
            with torch.no_grad():  # Kaiming-uniform like nn.Linear, but seeded and fast
                bound = 1.0 / math.sqrt(in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
            setattr(self, name, layer)


def layer_shapes(smoke: bool) -> tuple:
    if not smoke:
        return LLAMA7B_LAYER
    return tuple((name, max(16, out // 64), max(16, inp // 64)) for name, out, inp in LLAMA7B_LAYER)


def bench_init(args: argparse.Namespace, device: torch.device) -> dict:
    """Exact SVD per matrix against svd_method="auto", interleaved; then each expert's subspace."""
    from ..config import GoatConfig
    from ..inject import inject_goat_layers

    shapes = layer_shapes(args.smoke)
    repeats = 1 if args.smoke else max(1, args.init_repeats)
    block = LayerBlock(shapes, args.seed).to(device)
    originals = {name: getattr(block, name).weight.detach().clone() for name, _, _ in shapes}
    targets = [name for name, _, _ in shapes]
    # "auto" picks the exact SVD for the tiny smoke shapes; force the Gram route there so it runs.
    fast = "gram" if args.smoke else "auto"
    times = {"exact": [], fast: []}
    layers = {}
    for _ in range(repeats):  # interleaved, so background load hits both alike
        for method in ("exact", fast):
            model = copy.deepcopy(block)
            config = GoatConfig(r=args.rank, num_experts=args.experts, top_k=args.top_k, svd_method=method)
            elapsed = timed(
                lambda m=model, c=config, k=method: layers.__setitem__(k, inject_goat_layers(m, c, targets)), device
            )
            times[method].append(elapsed)
            del model
    from ..svd import compute_device, resolve_method

    fast_method = f"{fast} -> {resolve_method(fast, originals[targets[0]])} on {compute_device(originals[targets[0]])}"
    quality = init_quality(layers["exact"], layers[fast], originals)
    layers.clear()  # free both models' layers before the largest matrix is timed
    largest = max(targets, key=lambda name: originals[name].numel())
    largest_matrix = bench_init_matrix(largest, originals[largest], args, "gram" if args.smoke else "auto", repeats)
    exact_s, fast_s = timing_stats(times["exact"]), timing_stats(times[fast])
    return {
        "shapes": ", ".join(f"{n} {o}x{i}" for n, o, i in shapes),
        "rank": args.rank,
        "experts": args.experts,
        "expert_rank": args.rank // args.experts,
        "device": str(device),
        "repeats": repeats,
        "fast_method": fast_method,
        "exact_s": exact_s,
        "fast_s": fast_s,
        "speedup": exact_s["median"] / fast_s["median"],
        "target_speedup": INIT_TARGET,
        "met": exact_s["median"] / fast_s["median"] >= INIT_TARGET,
        "quality": quality,
        "largest_matrix": largest_matrix,
    }


def bench_init_matrix(name: str, weight: torch.Tensor, args: argparse.Namespace, method: str, repeats: int) -> dict:
    r"""One matrix alone: the exact SVD against `method`, and where the Gram route's floor lies.

    On the CPU the route for large h reduces the h x h Gram matrix G in two stages (svd.py): to a band
    matrix with blocked matrix-matrix products, then the band matrix's eigenvalues. Forming G and those
    two steps are timed apart, on the same matrix: whatever else the route does, it cannot beat the
    exact SVD by more than exact / (their sum). Beside them the one-stage route (LAPACK sytrd, the
    route for smaller h, half its flops in memory-bound matrix-vector products) and sytrd alone, the
    floor that route had."""
    from scipy.linalg import eig_banded

    from ..functional import expert_component_indices
    from ..svd import (
        band_reduce_,
        band_width,
        gram_block_triangle,
        gram_lower_column_major,
        gram_singular_components,
        lapack_available,
        lower_band_storage,
        singular_components,
    )

    rows, cols = weight.shape
    wide, bandwidth = rows < cols, band_width(min(rows, cols))
    indices = expert_component_indices("goat", min(rows, cols), args.experts, args.rank // args.experts).reshape(-1)
    steps = ("gram_product", "band_reduction", "band_eigenvalues", "one_stage", "sytrd")
    times: dict[str, list[float]] = {"exact": [], method: [], **{step: [] for step in steps}}
    device = weight.device
    floor_measurable = device.type == "cpu" and lapack_available()
    for _ in range(repeats):  # interleaved like the whole layer
        times["exact"].append(timed(lambda: singular_components(weight, indices, "exact"), device))
        times[method].append(timed(lambda: singular_components(weight, indices, method), device))
        if floor_measurable:  # the CPU only: no device to synchronise
            from scipy.linalg import lapack
            from threadpoolctl import threadpool_limits

            _timed_call(times["one_stage"], gram_singular_components, [weight.float()], indices[None], two_stage=False)
            with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
                lower = _timed_call(times["gram_product"], gram_block_triangle, weight.float(), wide, upper=False)
                _timed_call(times["band_reduction"], band_reduce_, lower, bandwidth)
                band = lower_band_storage(lower, bandwidth)
                _timed_call(times["band_eigenvalues"], eig_banded, band, lower=True, eigvals_only=True)
                gram = gram_lower_column_major(weight.float(), wide)
                _timed_call(times["sytrd"], lapack.ssytrd, gram, lower=1, overwrite_a=1)
            del lower, band, gram
    exact_s, fast_s = timing_stats(times["exact"]), timing_stats(times[method])
    figures = {
        "name": name,
        "shape": f"{rows}x{cols}",
        "exact_s": exact_s,
        "fast_s": fast_s,
        "speedup": exact_s["median"] / fast_s["median"],
    }
    if floor_measurable:
        floor = statistics.median(g + r + e for g, r, e in zip(*(times[k] for k in steps[:3])))
        figures.update({f"{step}_s": timing_stats(times[step]) for step in steps})
        figures.update(
            floor_s=floor,
            floor_share=floor / fast_s["median"],
            floor_speedup=exact_s["median"] / floor,
            one_stage_speedup=exact_s["median"] / figures["one_stage_s"]["median"],
        )
    return figures


def _timed_call(into: list[float], function, *args, **kwargs):
    """function(*args, **kwargs), its wall time appended to `into` (CPU work: nothing to synchronise)."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    into.append(time.perf_counter() - start)
    return result


def _largest_angle_deg(B: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest principal angle, in degrees, between the column spaces of B and `reference`."""
    Q, R = torch.linalg.qr(B.double())[0], torch.linalg.qr(reference.double())[0]
    cosines = torch.linalg.svdvals(Q.T @ R).clamp(max=1.0)
    return math.degrees(float(torch.arccos(cosines.min())))


def init_quality(exact_layers: dict, fast_layers: dict, originals: dict) -> dict:
    r"""Both routes judged against a float64 SVD of W0: per expert j, the largest principal angle
    between the column space of B_j and the float64 left singular vectors of expert j's components
    (the row spaces of A_j give the same figure up to rounding). A float32 SVD is no reference: on
    CUDA its default driver was 13 degrees off. Beside that, the relative error
    |s B_j A_j - s B_j^exact A_j^exact|_F / |s B_j^exact A_j^exact|_F of the fast route against the
    exact one (sign-free), and per layer the alignment error |(W0 - W_res) + c s sum_j B_j A_j - W0|_F / |W0|_F
    of the fast route's layer (k = E)."""
    from ..functional import expert_component_indices

    angles, exact_angles, errors, alignment, per_layer = [], [], [], [], {}
    for name, fast in fast_layers.items():
        exact = exact_layers[name]
        d, E = fast.expert_rank, fast.num_experts
        W0 = originals[name].double()
        U64 = torch.linalg.svd(W0, full_matrices=False)[0]  # float64: the reference for both routes
        components = expert_component_indices("goat", min(W0.shape), E, d).to(U64.device)
        layer_angles, layer_exact_angles, layer_errors = [], [], []
        for j in range(E):
            cols = slice(j * d, (j + 1) * d)
            reference = U64[:, components[j]]
            Bf, Be = fast.init_B[:, cols].double(), exact.init_B[:, cols].double()
            Af, Ae = fast.init_A[cols].double(), exact.init_A[cols].double()
            layer_angles.append(_largest_angle_deg(Bf, reference))
            layer_exact_angles.append(_largest_angle_deg(Be, reference))
            scale_f, scale_e = float(fast.expert_scale[j]), float(exact.expert_scale[j])
            Pf, Pe = scale_f * Bf @ Af, scale_e * Be @ Ae
            layer_errors.append(float(torch.linalg.norm(Pf - Pe) / torch.linalg.norm(Pe).clamp_min(1e-300)))
        W_eff = base_weight(fast).double() + fast.residual().double()
        alignment.append(float(torch.linalg.norm(W_eff - W0) / torch.linalg.norm(W0)))
        angles += layer_angles
        exact_angles += layer_exact_angles
        errors += layer_errors
        per_layer[name] = {
            "max_angle_deg": max(layer_angles),
            "exact_max_angle_deg": max(layer_exact_angles),
            "max_rel_error": max(layer_errors),
        }
    return {
        "experts_compared": len(angles),
        "reference": "float64 SVD",
        "max_angle_deg": max(angles),
        "median_angle_deg": statistics.median(angles),
        "exact_max_angle_deg": max(exact_angles),
        "exact_median_angle_deg": statistics.median(exact_angles),
        "max_rel_error": max(errors),
        "median_rel_error": statistics.median(errors),
        "max_alignment_error": max(alignment),
        "per_layer": per_layer,
    }


def base_weight(layer) -> torch.Tensor:
    from ..layer import base_weight_2d

    return base_weight_2d(layer.base_layer).detach()
