"""The fast initialisation (svd.py, inject.all_initial_factors): accuracy against the exact SVD on
matrices with a realistic (decaying) spectrum, batching over equal shapes, and the exact alignment
of the adapted model with the pretrained one whichever route computed the factors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from goat_lora import functional as F
from goat_lora import svd
from goat_lora.config import GoatConfig
from goat_lora.inject import all_initial_factors, initial_factors, layer_generator
from goat_lora.model import get_goat_model
from goat_lora.svd import (
    AUTO_EXACT_MAX_ELEMENTS,
    batched_singular_components,
    compute_device,
    resolve_method,
    singular_components,
)


def realistic_weight(m: int, n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """W = U diag(S) V^T with a decaying spectrum (power law plus a noise floor), as pretrained
    layers have; singular values distinct, so each singular vector is well defined."""
    g = torch.Generator().manual_seed(seed)
    h = min(m, n)
    U = torch.linalg.qr(torch.randn(m, h, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, h, generator=g, dtype=torch.float64))[0]
    i = torch.arange(h, dtype=torch.float64)
    S = 3.0 * (1.0 + i) ** -0.7 + 0.05 * (1.0 - i / h)  # sigma_max / sigma_min about 40
    return (U * S) @ V.T if dtype == torch.float64 else ((U * S) @ V.T).to(dtype)


def components64(W: torch.Tensor, idx: torch.Tensor):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, idx], S[idx], Vh[idx].T


def max_angle_deg(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Largest principal angle between the column spaces of X and Y."""
    Qx, Qy = torch.linalg.qr(X.double())[0], torch.linalg.qr(Y.double())[0]
    cos = torch.linalg.svdvals(Qx.T @ Qy).clamp(max=1.0)
    return math.degrees(float(torch.arccos(cos.min())))


@pytest.mark.parametrize("route", ["one-stage", "two-stage"])
@pytest.mark.parametrize("shape", [(96, 64), (64, 160), (128, 128)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("init", ["goat", "goat_mini", "minor"])
def test_gram_matches_exact_svd_on_a_realistic_spectrum(shape, init, route, monkeypatch):
    if route == "two-stage":  # the CPU route for large h, here at test sizes
        _two_stage_everywhere(monkeypatch)
    m, n = shape
    W = realistic_weight(m, n, seed=m + n)
    E, d = 8, 2
    idx = F.expert_component_indices(init, min(m, n), E, d).reshape(-1)
    U, S, V = singular_components(W, idx, "gram")
    assert U.dtype == S.dtype == V.dtype == torch.float32
    assert U.shape == (m, E * d) and S.shape == (E * d,) and V.shape == (n, E * d)
    U64, S64, V64 = components64(W, idx)
    torch.testing.assert_close(S.double(), S64, rtol=1e-5, atol=1e-6)
    for j in range(E):
        cols = slice(j * d, (j + 1) * d)
        # float32 eigh of the Gram alone is off by up to 0.6 degrees at the tail here (eps sigma_max^2 /
        # (sigma_i^2 - sigma_k^2), gaps 3e-4 sigma_max); the Rayleigh-Ritz window brings it to the
        # float32 SVD's own error (about 0.002 degrees)
        assert max_angle_deg(U[:, cols], U64[:, cols]) < 0.02
        assert max_angle_deg(V[:, cols], V64[:, cols]) < 0.02
        # the expert's rank-d piece U_j S_j V_j^T, which is free of the singular vectors' signs
        piece = (U[:, cols].double() * S[cols].double()) @ V[:, cols].double().T
        piece64 = (U64[:, cols] * S64[cols]) @ V64[:, cols].T
        assert float(torch.linalg.norm(piece - piece64) / torch.linalg.norm(piece64)) < 1e-4


def test_gram_is_about_as_accurate_as_the_float32_exact_svd():
    W = realistic_weight(200, 120, seed=7)
    idx = F.expert_component_indices("goat", 120, 8, 1).reshape(-1)
    U64, S64, V64 = components64(W, idx)
    for method, bound in (("exact", 1e-5), ("gram", 1e-5)):
        U, S, V = singular_components(W, idx, method)
        recon = (U.double() * S.double()) @ V.double().T
        error = torch.linalg.norm(recon - (U64 * S64) @ V64.T) / torch.linalg.norm(S64)
        assert float(error) < bound, (method, float(error))


def test_float64_weights_stay_float64_and_match_closely():
    W = realistic_weight(80, 48, seed=1, dtype=torch.float64)
    idx = torch.tensor([0, 6, 12, 18, 24, 30])
    U, S, V = singular_components(W, idx, "gram")
    assert U.dtype == S.dtype == V.dtype == torch.float64
    U64, S64, V64 = components64(W, idx)
    torch.testing.assert_close((U * S) @ V.T, (U64 * S64) @ V64.T, rtol=1e-9, atol=1e-11)


def test_bfloat16_weight_is_decomposed_in_float32():
    W = realistic_weight(64, 48, seed=2).to(torch.bfloat16)
    U, S, V = singular_components(W, torch.arange(4), "gram")
    assert U.dtype == torch.float32
    U64, S64, V64 = components64(W.float(), torch.arange(4))
    torch.testing.assert_close(S.double(), S64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gram", "exact"])
def test_batched_equals_one_at_a_time_with_different_indices_per_matrix(method):
    weights = [realistic_weight(72, 40, seed=s) for s in range(3)]
    g = torch.Generator().manual_seed(0)
    indices = torch.stack([F.expert_component_indices("random", 40, 4, 2, g).reshape(-1) for _ in weights])
    batched = batched_singular_components(weights, indices, method)
    assert len(batched) == 3
    for W, idx, (U, S, V) in zip(weights, indices, batched):
        U1, S1, V1 = singular_components(W, idx, method)
        torch.testing.assert_close(S, S1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((U * S) @ V.T, (U1 * S1) @ V1.T, rtol=1e-4, atol=1e-5)


def test_batched_refuses_mixed_shapes():
    with pytest.raises(ValueError, match="one shape"):
        batched_singular_components([torch.randn(8, 4), torch.randn(4, 8)], torch.zeros(2, 1, dtype=torch.long))


def test_auto_is_exact_for_small_layers_and_gram_for_large_ones():
    small = torch.empty(384, 384, device="meta")
    large = torch.empty(4096, 4096, device="meta")
    assert 384 * 384 <= AUTO_EXACT_MAX_ELEMENTS < 4096 * 4096
    assert resolve_method("auto", small) == "exact"
    assert resolve_method("auto", large) == "gram"
    assert resolve_method("exact", large) == "exact" and resolve_method("gram", small) == "gram"
    with pytest.raises(ValueError):
        resolve_method("lobpcg", small)


def test_compute_device_prefers_the_weights_accelerator_then_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert compute_device(torch.zeros(2, 2)).type == expected


class Stack(nn.Module):
    """Equal shapes (batched together) and distinct ones, tall and wide."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k = nn.Linear(48, 48), nn.Linear(48, 48)
        self.up, self.down = nn.Linear(48, 96), nn.Linear(96, 48)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.q(x) + self.k(x))))


@pytest.mark.parametrize("method", ["gram", "exact"])
def test_all_initial_factors_equals_initial_factors_layer_by_layer(method):
    model = Stack()
    config = GoatConfig(r=8, num_experts=4, init="random", svd_method=method)
    names = ["q", "k", "up", "down"]
    modules = {n: model.get_submodule(n) for n in names}
    batched = all_initial_factors(modules, config, {n: layer_generator(0, i) for i, n in enumerate(names)})
    for i, name in enumerate(names):
        single = initial_factors(name, modules[name], config, layer_generator(0, i))
        torch.testing.assert_close(batched[name].expert_scale, single.expert_scale)
        torch.testing.assert_close(batched[name].B @ batched[name].A, single.B @ single.A, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["gram", "exact"])
def test_alignment_is_exact_whichever_method(method):
    """top_k = E and all-zero routers (uniform weights 1/E): the adapted model's output equals the
    pretrained model's, because W_res is built from the very factors the experts start from."""
    model = Stack()
    x = torch.randn(5, 7, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    config = GoatConfig(r=8, num_experts=4, top_k=4, dropout=0.0, svd_method=method)
    goat = get_goat_model(model, config).eval()
    with torch.no_grad():
        for layer in goat.goat_layers():
            layer.router.weight.zero_()
        actual = goat(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-6)


# ---- the CPU route through LAPACK: only the windows' eigenvectors ---------------------------------


def _dense_eigh_only(monkeypatch):
    monkeypatch.setattr(svd, "lapack_available", lambda: False)


@pytest.mark.parametrize("shape", [(96, 64), (64, 160)], ids=["tall", "wide"])
@pytest.mark.parametrize("init", ["goat", "principal", "minor"])
def test_lapack_route_equals_the_dense_eigh_route(shape, init, monkeypatch):
    W = realistic_weight(*shape, seed=11)
    idx = F.expert_component_indices(init, min(shape), 4, 2).reshape(-1)
    assert svd.lapack_available()
    U, S, V = singular_components(W, idx, "gram")
    _dense_eigh_only(monkeypatch)
    U2, S2, V2 = singular_components(W, idx, "gram")
    torch.testing.assert_close(S, S2, rtol=1e-6, atol=1e-7)
    for j in range(4):
        cols = slice(2 * j, 2 * j + 2)
        torch.testing.assert_close(
            (U[:, cols] * S[cols]) @ V[:, cols].T, (U2[:, cols] * S2[cols]) @ V2[:, cols].T, rtol=1e-4, atol=1e-6
        )


def test_lapack_route_forms_only_the_window_eigenvectors(monkeypatch):
    """E = 8 experts of d = 1 with margin 3: 8 windows of at most 7 vectors, not all 200."""
    from scipy.linalg import lapack

    formed = []
    original = lapack.sstein

    def counting_stein(d, e, w, *rest):
        formed.append(len(w))
        return original(d, e, w, *rest)

    monkeypatch.setattr(lapack, "sstein", counting_stein)
    W = realistic_weight(300, 200, seed=4)
    idx = F.expert_component_indices("goat", 200, 8, 1).reshape(-1)
    U, S, V = svd.gram_singular_components([W], idx[None], margin=3)[0]
    assert len(formed) == 8 and sum(formed) <= 8 * 7  # windows at the ends of the spectrum are cut short
    U64, S64, V64 = components64(W, idx)
    torch.testing.assert_close(S.double(), S64, rtol=1e-5, atol=1e-6)
    for j in range(8):
        assert max_angle_deg(V[:, j : j + 1], V64[:, j : j + 1]) < 0.05


def test_lapack_route_handles_a_tridiagonal_that_splits():
    """A block-diagonal W has a block-diagonal Gram matrix: T splits into independent blocks, and the
    index ranges given to bisection must still select the global spectrum's components."""
    blocks = [realistic_weight(40, 30, seed=1) * 2.0, realistic_weight(50, 34, seed=2)]
    W = torch.block_diag(*blocks)  # (90, 64)
    idx = torch.arange(0, 64, 4)
    U, S, V = singular_components(W, idx, "gram")
    U64, S64, V64 = components64(W, idx)
    torch.testing.assert_close(S.double(), S64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(((U * S) @ V.T).double(), (U64 * S64) @ V64.T, rtol=1e-4, atol=1e-5)


def test_lapack_failure_falls_back_to_the_dense_eigh(monkeypatch):
    W = realistic_weight(96, 64, seed=5)
    idx = F.expert_component_indices("goat", 64, 4, 2).reshape(-1)
    expected = singular_components(W, idx, "gram")
    monkeypatch.setattr(svd, "_lapack_window_eigenvectors", lambda *args: None)  # as when stein reports info > 0
    actual = singular_components(W, idx, "gram")
    for x, y in zip(actual, expected):
        assert torch.isfinite(x).all()
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(50, 20), (20, 50)], ids=["tall", "wide"])
def test_half_gram_holds_the_gram_matrix_in_its_lower_triangle(shape, monkeypatch):
    monkeypatch.setattr(svd, "GRAM_BLOCK", 7)  # several blocks, the last one short
    W = torch.randn(*shape, dtype=torch.float64)
    wide = shape[0] < shape[1]
    lower = torch.from_numpy(svd.gram_lower_column_major(W, wide).copy())
    gram = W @ W.T if wide else W.T @ W
    torch.testing.assert_close(torch.tril(lower), torch.tril(gram))


def test_lapack_runs_with_torchs_thread_count(monkeypatch):
    import threadpoolctl

    seen = []

    class Recording(threadpoolctl.threadpool_limits):
        def __init__(self, limits=None, user_api=None):
            seen.append((limits, user_api))
            super().__init__(limits=limits, user_api=user_api)

    monkeypatch.setattr(threadpoolctl, "threadpool_limits", Recording)
    singular_components(realistic_weight(40, 30, seed=0), torch.arange(3), "gram")
    assert seen == [(torch.get_num_threads(), "blas")]


# ---- the CPU route for large h: band reduction, band eigenvalues, block iteration at each run ------


def _two_stage_everywhere(monkeypatch, band: int = 8):
    """The two-stage route at test sizes, with a narrow band (many panels) and small Gram blocks
    (panels that straddle block boundaries); the one-stage route may not stand in for it."""
    monkeypatch.setattr(svd, "TWO_STAGE_MIN_SIZE", 1)
    monkeypatch.setattr(svd, "BAND", band)
    monkeypatch.setattr(svd, "GRAM_BLOCK", 24)

    def no_fallback(*args):
        raise AssertionError("the two-stage route fell back to sytrd")

    monkeypatch.setattr(svd, "_lapack_window_eigenvectors", no_fallback)


def test_band_reduction_is_an_orthogonal_similarity(monkeypatch):
    """Stage 1 on its own: B = Q1^T G Q1 is banded, Q1 orthogonal, and B's band is what it stores."""
    monkeypatch.setattr(svd, "GRAM_BLOCK", 16)
    X = torch.randn(120, 70, dtype=torch.float64)
    G = X.T @ X
    lower = svd.gram_block_triangle(X, wide=False, upper=False)
    reflectors = svd.band_reduce_(lower, 8)
    Q1 = svd.apply_band_reflectors(reflectors, torch.eye(70, dtype=torch.float64))
    torch.testing.assert_close(Q1.T @ Q1, torch.eye(70, dtype=torch.float64))
    B = Q1.T @ G @ Q1
    outside = torch.ones(70, 70, dtype=torch.bool).tril(-9) | torch.ones(70, 70, dtype=torch.bool).triu(9)
    assert float(B[outside].abs().max()) < 1e-10 * float(G.abs().max())
    band = svd.lower_band_storage(lower, 8)
    for d in range(9):
        torch.testing.assert_close(torch.from_numpy(band[d, : 70 - d]), torch.diagonal(B, -d))
    torch.testing.assert_close(torch.from_numpy(svd.band_times(band, np.eye(70))), B)


@pytest.mark.parametrize("d", [1, 3])
def test_two_stage_route_on_closely_spaced_singular_values(d, monkeypatch):
    """A random (uniform) matrix: relative gaps of about 1e-3, the case where the block's unsettled
    edge produces Ritz pairs inside the window (the run must still be found at its place)."""
    _two_stage_everywhere(monkeypatch, band=16)
    g = torch.Generator().manual_seed(3)
    W = (torch.rand(700, 400, generator=g) * 2 - 1) / 20
    idx = F.expert_component_indices("goat", 400, 8, d).reshape(-1)
    U, S, V = singular_components(W, idx, "gram")
    U64, S64, V64 = components64(W, idx)
    torch.testing.assert_close(S.double(), S64, rtol=1e-5, atol=1e-7)
    for j in range(8):
        cols = slice(j * d, (j + 1) * d)
        assert max_angle_deg(V[:, cols], V64[:, cols]) < 0.05
    piece = ((U * S) @ V.T).double()
    torch.testing.assert_close(piece, (U64 * S64) @ V64.T, rtol=0, atol=1e-5 * float(S64[0]))


def test_two_stage_route_keeps_float64_weights_float64(monkeypatch):
    _two_stage_everywhere(monkeypatch)
    W = realistic_weight(90, 70, seed=2, dtype=torch.float64)
    idx = F.expert_component_indices("goat", 70, 4, 2).reshape(-1)
    U, S, V = singular_components(W, idx, "gram")
    assert U.dtype == S.dtype == V.dtype == torch.float64
    U64, S64, V64 = components64(W, idx)
    torch.testing.assert_close(S, S64, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((U * S) @ V.T, (U64 * S64) @ V64.T, rtol=0, atol=1e-9)


def test_a_run_that_does_not_settle_falls_back_to_the_one_stage_route(monkeypatch):
    W = realistic_weight(96, 64, seed=5)
    idx = F.expert_component_indices("goat", 64, 4, 2).reshape(-1)
    one_stage = svd.gram_singular_components([W], idx[None], two_stage=False)[0]
    monkeypatch.setattr(svd, "RUN_TOLERANCE", 0.0)  # no residual is ever small enough
    monkeypatch.setattr(svd, "SHIFT_MAX_ITERATIONS", 5)
    calls = []
    original = svd._lapack_window_eigenvectors
    monkeypatch.setattr(svd, "_lapack_window_eigenvectors", lambda *args: calls.append(1) or original(*args))
    assert svd._band_window_eigenvectors(W, False, svd._windows(idx.tolist(), svd.RITZ_MARGIN, 64)) is None
    fallen_back = svd.gram_singular_components([W], idx[None], two_stage=True)[0]
    assert calls == [1]
    for x, y in zip(fallen_back, one_stage):
        torch.testing.assert_close(x, y)


def test_the_two_stage_route_is_taken_from_its_size_up(monkeypatch):
    taken = []
    original = svd._band_window_eigenvectors
    monkeypatch.setattr(svd, "_band_window_eigenvectors", lambda *args: taken.append(1) or original(*args))
    W = realistic_weight(80, 60, seed=1)
    idx = F.expert_component_indices("goat", 60, 4, 1).reshape(-1)
    singular_components(W, idx, "gram")
    assert taken == []  # 60 < TWO_STAGE_MIN_SIZE
    monkeypatch.setattr(svd, "TWO_STAGE_MIN_SIZE", 60)
    singular_components(W, idx, "gram")
    assert taken == [1]


# ---- the exact route's SVD, accurate on every device ---------------------------------------------
def _llama_like(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A float32 matrix whose singular values lie close together, as LLaMA-2-7B's do (gaps ~1e-3)."""
    g = torch.Generator().manual_seed(seed)
    h = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, h, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, h, generator=g, dtype=torch.float64))
    return ((U * torch.linspace(1.5, 0.01, h, dtype=torch.float64)) @ V.T).float()


@pytest.mark.parametrize("shape", [(512, 512), (768, 256), (256, 768)])
def test_lapack_float32_svd_passes_the_accuracy_check(shape):
    """The check accurate_svd applies to cuSOLVER's gesvda accepts what LAPACK's float32 SVD gives."""
    from goat_lora.svd import SVD_RESIDUAL_TOLERANCE, svd_residual

    W = _llama_like(*shape)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert svd_residual(W, U, S, Vh) < SVD_RESIDUAL_TOLERANCE / 4


def test_the_accuracy_check_refuses_vectors_a_few_degrees_off():
    """Two neighbouring singular pairs mixed by 5 degrees (what gesvdj's float32 result looks like on
    LLaMA-shaped matrices, where it was 13 degrees off) fail the check."""
    import math

    from goat_lora.svd import SVD_RESIDUAL_TOLERANCE, svd_residual

    W = _llama_like(512, 512)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    c, s = math.cos(math.radians(5)), math.sin(math.radians(5))
    i, j = 40, 41
    U, Vh = U.clone(), Vh.clone()
    U[:, i], U[:, j] = c * U[:, i] + s * U[:, j], -s * U[:, i] + c * U[:, j]
    Vh[i], Vh[j] = c * Vh[i] + s * Vh[j], -s * Vh[i] + c * Vh[j]
    assert svd_residual(W, U, S, Vh) > SVD_RESIDUAL_TOLERANCE


def test_accurate_svd_on_the_cpu_is_torchs_svd():
    from goat_lora.svd import accurate_svd

    W = _llama_like(300, 200)
    for got, want in zip(accurate_svd(W), torch.linalg.svd(W, full_matrices=False)):
        assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA SVD drivers need a GPU; none here")
@pytest.mark.parametrize("shape", [(1024, 1024), (2048, 512), (512, 2048)])
def test_exact_route_on_cuda_is_within_a_tenth_of_a_degree_of_float64(shape):
    """Every expert's singular vectors from the exact route on CUDA (float32 weight) against a float64
    SVD: the default driver was 13 degrees off on LLaMA-2-7B shapes; LAPACK float32 0.045."""
    from goat_lora.svd import singular_components

    W = _llama_like(*shape).cuda()
    idx = torch.arange(0, min(shape), max(1, min(shape) // 16))
    U, S, V = singular_components(W, idx, "exact")
    U64, S64, Vh64 = torch.linalg.svd(W.double(), full_matrices=False)
    for got, want in ((U, U64[:, idx]), (V, Vh64[idx].T)):
        cosines = (got.double() * want).sum(0).abs().clamp(max=1.0)
        assert torch.rad2deg(torch.acos(cosines)).max() < 0.1
