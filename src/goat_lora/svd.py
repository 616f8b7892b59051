r"""The singular components GOAT initialises its experts from.

Only d components at E places of the spectrum are needed, so besides the exact SVD there is a
faster route through the smaller Gram matrix:

    exact  torch.linalg.svd of W (float32; float64 for a float64 weight), one matrix at a time.
           This is what the public GOAT code does. On CUDA not with torch's default driver
           (gesvdj), whose float32 vectors are up to 13 degrees off (accurate_svd).
    gram   h = min(m, n);  the h x h Gram matrix  G = W^T W (m >= n)  or  W W^T (m < n)  is
           symmetric with eigenvalues S^2 and eigenvectors V (resp. U). Only the eigenvectors in a
           window around each wanted run are computed (on the CPU for large h: reduction to a band
           matrix, its eigenvalues, and a block iteration at each run; for smaller h through
           LAPACK: tridiagonal reduction, bisection and inverse iteration for the chosen
           eigenvalues; on a GPU one batched eigh), then a Rayleigh-Ritz step on W itself gives
           the singular triplets.
           Float32 for float32 / bf16 / fp16 weights (float64 for float64 weights).
    auto   "exact" for layers of at most AUTO_EXACT_MAX_ELEMENTS elements, "gram" above.

Why "auto" draws the line there: for small layers (every layer of MiniLM or SmolLM2-135M) the
exact SVD costs milliseconds and is as accurate as float32 allows, so there is nothing to win. For
large ones the Gram route is faster (docs/benchmarks.md has the LLaMA-2-7B layer's figures): it
reduces one h x h symmetric matrix instead of bidiagonalising the m x n one, forms the Gram matrix's
lower triangle only, never forms singular vectors of the long side, and forms only the few
eigenvectors that are needed; on a GPU cuSOLVER's eigh is much faster than its SVD. Its price
would be accuracy for small singular values: squaring W squares its condition number, so the
float32 eigenvectors of G are perturbed by about eps_32 sigma_max^2 / (sigma_i^2 - sigma_k^2)
instead of eps_32 sigma_max / |sigma_i - sigma_k|. That error is almost all mixing with spectral
neighbours, which the Rayleigh-Ritz window removes: after it, each expert's subspace agrees with
the float32 SVD's to a few hundredths of a degree (tests/test_svd.py; docs/benchmarks.md).
Whichever route, the residual W_res is built from the same factors as the experts, so the adapted
model equals the pretrained one at k = E exactly.

Computation runs on the weight's device, or on CUDA when the weight is on the CPU and a GPU is
present; results come back on the weight's device.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import SvdMethod

# Below this many elements an exact SVD is cheap enough (a few ms) and "auto" uses it.
AUTO_EXACT_MAX_ELEMENTS = 1024 * 1024
# Rayleigh-Ritz window: spectral neighbours on each side of a wanted run (see gram_singular_components).
RITZ_MARGIN = 16
# Largest number of Gram matrices eigendecomposed in one batched call (bounds memory).
MAX_GRAM_BATCH_ELEMENTS = 8 * 4096 * 4096
# Column block of the half Gram product (blocks on one side of the diagonal only).
GRAM_BLOCK = 512
# The two-stage CPU route (_band_window_eigenvectors) from this h = min(m, n) up. Below it sytrd's
# matrix-vector half runs from cache and the one-stage route is faster (h = 2048: about 0.9 s
# against 2 s on 2 cores; at h = 4096 the two-stage route is faster, docs/benchmarks.md).
TWO_STAGE_MIN_SIZE = 3072
# Its band width: wide enough for fast matrix-matrix products in stage 1, narrow enough for stage 2.
BAND = 48
# Its block iteration: steps before the first convergence test, steps at most, and the wanted run's
# largest residual, in units of the weight's precision (eps of float32, or float64) times the run's
# gap to its neighbouring eigenvalues: the eigenvectors' angle error is about residual / gap.
SHIFT_ITERATIONS = 4
SHIFT_MAX_ITERATIONS = 16
RUN_TOLERANCE = 8.0


def resolve_method(method: str, weight: torch.Tensor) -> str:
    """The concrete method ("exact" or "gram") that `method` means for this weight (m, n)."""
    method = SvdMethod(method)
    if method is SvdMethod.AUTO:
        rows, cols = weight.shape[-2:]
        return SvdMethod.EXACT.value if rows * cols <= AUTO_EXACT_MAX_ELEMENTS else SvdMethod.GRAM.value
    return method.value


def compute_device(weight: torch.Tensor) -> torch.device:
    """Where the decomposition runs: the weight's own accelerator, else CUDA when present, else the CPU."""
    if weight.device.type != "cpu":
        return weight.device
    return torch.device("cuda") if torch.cuda.is_available() else weight.device


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def singular_components(
    weight: torch.Tensor, indices: torch.Tensor, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""U[:, idx] (m, K), S[idx] (K,), V[:, idx] (n, K) of W = U diag(S) V^T for flat `indices`
    into the descending spectrum. float32 (float64 for a float64 weight), on the weight's device."""
    U, S, V = batched_singular_components([weight], indices[None], method)[0]
    return U, S, V


def batched_singular_components(
    weights: list[torch.Tensor], indices: torch.Tensor, method: str = "auto"
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    r"""(U_i[:, idx_i], S_i[idx_i], V_i[:, idx_i]) for each weight W_i (m, n) of one shape.

    `indices` is (N, K): row i holds the descending-spectrum indices wanted from W_i.
    Equal-shape Gram matrices are eigendecomposed in batches; "exact" runs one SVD per matrix.
    """
    if not weights:
        return []
    shape = tuple(weights[0].shape)
    if any(tuple(w.shape) != shape for w in weights):
        raise ValueError(
            f"batched_singular_components needs weights of one shape, got {[tuple(w.shape) for w in weights]}"
        )
    method = resolve_method(method, weights[0])
    indices = indices.reshape(len(weights), -1)
    if method == SvdMethod.EXACT.value:
        return [_exact(w, idx) for w, idx in zip(weights, indices)]
    rows, cols = shape
    chunk = max(1, MAX_GRAM_BATCH_ELEMENTS // (min(rows, cols) ** 2))
    out = []
    for start in range(0, len(weights), chunk):
        out += gram_singular_components(weights[start : start + chunk], indices[start : start + chunk])
    return out


# accurate_svd's check: every triplet's residual ||W v - s u|| at most this many eps * sqrt(max(m, n))
# times sigma_max. LAPACK's float32 SVD reaches about 0.3 (1024 x 1024 and 2048 x 512 with a LLaMA-like
# spectrum); cuSOLVER's gesvdj, 13 degrees off on a 4096 x 4096 LLaMA-2-7B matrix, about 20 there.
SVD_RESIDUAL_TOLERANCE = 4.0


def svd_residual(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> float:
    """max_i ||W v_i - s_i u_i|| / (eps sqrt(max(m, n)) sigma_max): how far a thin SVD of W is from
    exact, in units of what a backward-stable float SVD leaves."""
    eps = torch.finfo(W.dtype).eps
    scale = eps * max(W.shape) ** 0.5 * float(S[0]) if S.numel() else 1.0
    return float((W @ Vh.mT - U * S).norm(dim=0).max()) / max(scale, torch.finfo(W.dtype).tiny)


def accurate_svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd(W, full_matrices=False), as accurate as LAPACK's float32 SVD on every device.

    On CUDA torch's default driver, gesvdj (Jacobi with a loose stopping rule), leaves float32
    singular vectors up to 13.1 degrees from a float64 SVD on LLaMA-2-7B's 4096 x 4096 matrices, whose
    singular values lie 1e-4 apart (LAPACK on the CPU: 0.045 degrees; docs/design.md). gesvda
    reached 2e-6 degrees there in 0.2 s (float64: 1.67 s), but it is an approximate method meant for
    tall matrices, so it runs on the tall orientation and its result is checked (svd_residual); one
    that fails the check is redone in float64 and returned in float32."""
    if W.device.type != "cuda" or W.dtype == torch.float64:
        return torch.linalg.svd(W, full_matrices=False)
    wide = W.shape[0] < W.shape[1]
    U, S, Vh = torch.linalg.svd(W.mT if wide else W, full_matrices=False, driver="gesvda")
    if wide:
        U, Vh = Vh.mT, U.mT
    if svd_residual(W, U, S, Vh) <= SVD_RESIDUAL_TOLERANCE:
        return U, S, Vh
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U.to(W.dtype), S.to(W.dtype), Vh.to(W.dtype)


def _exact(weight: torch.Tensor, indices: torch.Tensor):
    device = compute_device(weight)
    W = weight.detach().to(device=device, dtype=_work_dtype(weight))
    U, S, Vh = accurate_svd(W)
    idx = indices.to(device)
    return U[:, idx].to(weight.device), S[idx].to(weight.device), Vh[idx, :].T.to(weight.device)


def gram_singular_components(
    weights: list[torch.Tensor], indices: torch.Tensor, margin: int | None = None, two_stage: bool | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    r"""The Gram route for equal-shape weights (m, n); `indices` (N, K) into the descending spectrum.

    1. n <= m: G = W^T W = V diag(S^2) V^T (n x n, symmetric); m < n: G = W W^T = U diag(S^2) U^T.
    2. Eigenvectors of G only in spectral windows: for each run of wanted indices [a, b) the window
       [a - margin, b + margin). On the CPU just those are computed: from h = TWO_STAGE_MIN_SIZE
       through a band matrix (_band_window_eigenvectors; `two_stage` True / False overrides the
       size rule), below it through LAPACK's tridiagonal reduction (_lapack_window_eigenvectors),
       each falling back to the next if it fails; on a GPU (or without SciPy) one batched eigh
       computes all of them and the windows are sliced.
    3. Rayleigh-Ritz in each window: float32 eigenvectors of G are mixed mostly with their spectral
       neighbours (error ~ eps sigma_max^2 / (sigma_i^2 - sigma_k^2)), so orthonormalise the window
       (Q) and take the SVD of the thin W Q (m x w): its singular triplets, rotated back by Q, are
       the wanted ones with the neighbours' mixing removed. One m x n x (K + 2 margin E) matmul.
    """
    margin = RITZ_MARGIN if margin is None else margin
    rows, cols = weights[0].shape
    wide, h = rows < cols, min(rows, cols)
    device = compute_device(weights[0])
    dtype = _work_dtype(weights[0])
    work = [w.detach().to(device=device, dtype=dtype) for w in weights]
    windows = [_windows(idx.tolist(), margin, h) for idx in indices]
    # per matrix, per window: (eigenvectors of G around the run (h, w), how many of them lie above it)
    bases: list[list[tuple[torch.Tensor, int]] | None] = [None] * len(work)
    if device.type == "cpu" and lapack_available():
        for i, (w, win) in enumerate(zip(work, windows)):
            if (h >= TWO_STAGE_MIN_SIZE) if two_stage is None else two_stage:
                bases[i] = _band_window_eigenvectors(w, wide, win)
            if bases[i] is None:  # small h, or the inverse iteration did not settle a run
                bases[i] = _lapack_window_eigenvectors(w, wide, win)
    missing = [i for i, b in enumerate(bases) if b is None]  # GPU, no SciPy, or LAPACK gave up on one
    if missing:
        grams = torch.stack([work[i] @ work[i].T if wide else work[i].T @ work[i] for i in missing])  # (N', h, h)
        if device.type == "cpu":  # LAPACK syevd per matrix
            eigvecs = torch.linalg.eigh(grams).eigenvectors  # ascending eigenvalues
        else:  # one matrix per call: batched CUDA eigh may take cuSOLVER's Jacobi path (see docs/benchmarks.md)
            eigvecs = torch.stack([torch.linalg.eigh(gram).eigenvectors for gram in grams])
        del grams
        for i, vectors in zip(missing, eigvecs):
            descending = vectors.flip(-1)
            bases[i] = [(descending[:, lo:hi], a - lo) for a, _, lo, hi in windows[i]]
    out = []
    for i, w in enumerate(work):
        U, S, V = _windowed_ritz(w, windows[i], bases[i], wide)
        target = weights[i].device
        out.append((U.to(target), S.to(target), V.to(target)))
    return out


def _runs(wanted: list[int]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of consecutive descending indices, in the order they appear."""
    runs: list[tuple[int, int]] = []
    for index in wanted:
        if runs and index == runs[-1][1]:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def _windows(wanted: list[int], margin: int, h: int) -> list[tuple[int, int, int, int]]:
    """(a, b, lo, hi) per run [a, b) of wanted descending indices: the window [lo, hi) around it."""
    return [(a, b, max(0, a - margin), min(h, b + margin)) for a, b in _runs(wanted)]


# ---- selected eigenvectors through LAPACK (CPU) ------------------------------------------------


def lapack_available() -> bool:
    try:
        import scipy.linalg.lapack  # noqa: F401
        import threadpoolctl  # noqa: F401
    except ImportError:
        return False
    return True


def gram_block_triangle(W: torch.Tensor, wide: bool, upper: bool) -> torch.Tensor:
    """W's smaller Gram matrix G (h x h), only its blocks on and above (`upper`) or on and below the
    diagonal (GRAM_BLOCK aligned; diagonal blocks whole, the rest zero): about half the flops of
    W^T W, and all that the reductions below read."""
    X = W.T if wide else W  # (long side, h); G = X^T X
    h = X.shape[1]
    gram = torch.zeros(h, h, dtype=X.dtype)
    for start in range(0, h, GRAM_BLOCK):
        stop = min(h, start + GRAM_BLOCK)
        if upper:
            gram[start:stop, start:] = X[:, start:stop].T @ X[:, start:]
        else:
            gram[start:, start:stop] = X[:, start:].T @ X[:, start:stop]
    return gram


def gram_lower_column_major(W: torch.Tensor, wide: bool) -> np.ndarray:
    """G's lower triangle in a column-major array, what LAPACK's sytrd(lower) reads: the row-major
    upper block triangle read column-major (the same memory)."""
    return gram_block_triangle(W, wide, upper=True).numpy().T


def _lapack_window_eigenvectors(
    W: torch.Tensor, wide: bool, windows: list[tuple[int, int, int, int]]
) -> list[tuple[torch.Tensor, int]] | None:
    r"""Eigenvectors of G spanning each window [lo, hi) of the descending spectrum, without the others.

    A dense eigh spends most of its time on all h eigenvectors; here only the few wanted are formed:
      sytrd   G = Q T Q^T, T tridiagonal, Q = H_1 ... H_{h-1} kept as Householder reflectors
      stebz   the window's eigenvalues of T by bisection (to full accuracy, which stein needs)
      stein   their eigenvectors z of T by inverse iteration
      ormqr   x = Q z: reflector i acts on rows i+1.. and is stored below the subdiagonal, which is
              the QR (geqrf) layout of the trailing (h-1) x (h-1) block, so torch.ormqr applies it.
    Returns (the window's eigenvectors, a - lo: how many lie above the run) per window. LAPACK runs
    with torch's thread count. Returns None if LAPACK reports a failure (the caller then uses the
    dense eigh).
    """
    from scipy.linalg import lapack
    from threadpoolctl import threadpool_limits

    prefix = "d" if W.dtype == torch.float64 else "s"
    sytrd, stebz, stein = (getattr(lapack, prefix + name) for name in ("sytrd", "stebz", "stein"))
    h = W.shape[1] if not wide else W.shape[0]
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        gram = gram_lower_column_major(W, wide)
        reflectors, diagonal, off_diagonal, tau, info = sytrd(gram, lower=1, overwrite_a=1)
        if info != 0:
            return None
        abstol = 2 * np.finfo(diagonal.dtype).tiny
        tridiagonal_vectors = []
        for _, _, lo, hi in windows:
            first, last = h - hi + 1, h - lo  # 1-based ascending positions of descending [lo, hi)
            count, values, block, split, info = stebz(diagonal, off_diagonal, 2, 0.0, 0.0, first, last, abstol, "B")
            if info != 0 or count != last - first + 1:
                return None
            vectors, info = stein(diagonal, off_diagonal, values[:count], block, split)
            if info != 0:
                return None
            # their order does not matter ("B" sorts within split blocks only): the Ritz step sorts
            tridiagonal_vectors.append(vectors[:, :count])
    Z = torch.from_numpy(np.concatenate(tridiagonal_vectors, axis=1))  # (h, total window width)
    Householder = torch.from_numpy(reflectors)
    Z[1:] = torch.ormqr(Householder[1:, :-1], torch.from_numpy(tau), Z[1:])  # x = Q z (row 0 is untouched)
    bases = Z.split([hi - lo for _, _, lo, hi in windows], dim=1)
    return [(basis, a - lo) for basis, (a, _, lo, _) in zip(bases, windows)]


# ---- selected eigenvectors through a two-stage reduction (CPU, large h) ----------------------------
#
# sytrd spends half its flops in matrix-vector products (ssymv), bound by memory bandwidth: on a
# 4096 x 4096 Gram matrix it is most of the route (docs/benchmarks.md). Two stages avoid that:
#   stage 1  G = Q1 B Q1^T with B banded (bandwidth BAND): blocked Householder, all matrix-matrix
#            products on torch's BLAS (like LAPACK's sytrd_2stage, which neither SciPy nor torch exposes)
#   stage 2  all eigenvalues of B (LAPACK sbevd, float64: O(h^2 BAND), no eigenvectors)
#   vectors  per window, a block iterated until the wanted run has converged (shifted inverse or
#            power iteration, float64, _run_filter), Rayleigh-Ritz with B, and x = Q1 y brings the
#            vectors back to G's coordinates.


def band_width(h: int) -> int:
    """The band route's bandwidth for an h x h Gram matrix: BAND, or h - 1 for a smaller one."""
    return min(BAND, h - 1)


def band_reduce_(lower: torch.Tensor, bandwidth: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    r"""Stage 1, in place: G = Q1 B Q1^T, B banded with `bandwidth` sub-diagonals.

    `lower` holds G in its lower block triangle (GRAM_BLOCK aligned, diagonal blocks whole; the rest is
    never read); afterwards B's lower band is in its band (below it: zeros). For each panel of b
    columns starting at j, with trailing block C = G[s:, s:], s = j + b:
        QR of the panel below the band:   G[s:, j:s] = H R,  H = I - V T V^T  (compact WY)
        two-sided update:                 C <- H^T C H = C - V Z^T - Z V^T,
                                          Y = C V T,  Z = Y - 1/2 V (T^T V^T Y)
    C is symmetric and only its lower block triangle is kept, so Y = C V reads each block once for
    both triangles and the rank-2b update touches the lower blocks only (4 n^2 b flops, not 6 n^2 b).
    Returns the reflectors (s, V, T) with H acting on rows s: of G; Q1 = H_1 H_2 ... in that order.
    """
    h = lower.shape[0]
    reflectors = []
    for j in range(0, h - bandwidth - 1, bandwidth):
        s = j + bandwidth
        panel = lower[s:, j:s]
        qr, tau = torch.geqrf(panel)
        k = tau.shape[0]
        V = torch.tril(qr[:, :k], -1)
        V.diagonal().fill_(1.0)
        # larft: T^{-1} = diag(1 / tau) + strictly_upper(V^T V)
        T_inverse = torch.triu(V.T @ V, 1) + torch.diag(1.0 / tau)
        T = torch.linalg.solve_triangular(T_inverse, torch.eye(k, dtype=lower.dtype), upper=True)
        panel.zero_()
        panel[:k] = torch.triu(qr[:k])
        reflectors.append((s, V, T))
        bounds = [s, *range((s // GRAM_BLOCK + 1) * GRAM_BLOCK, h, GRAM_BLOCK), h]
        Y = torch.zeros(h - s, k, dtype=lower.dtype)
        for c0, c1 in zip(bounds[:-1], bounds[1:]):  # Y = C V from the lower block triangle of C
            Y[c0 - s :].addmm_(lower[c0:, c0:c1], V[c0 - s : c1 - s])
            if c1 < h:
                Y[c0 - s : c1 - s].addmm_(lower[c1:, c0:c1].T, V[c1 - s :])
        Y = Y @ T
        Z = Y - 0.5 * V @ (T.T @ (V.T @ Y))
        left, right = torch.cat([V, Z], 1), torch.cat([Z, V], 1)
        for c0, c1 in zip(bounds[:-1], bounds[1:]):  # C -= V Z^T + Z V^T, lower blocks only
            lower[c0:, c0:c1].addmm_(left[c0 - s :], right[c0 - s : c1 - s].T, alpha=-1.0)
    return reflectors


def apply_band_reflectors(reflectors: list[tuple[int, torch.Tensor, torch.Tensor]], Y: torch.Tensor) -> torch.Tensor:
    """x = Q1 y for each column of Y (h, w): the stage-1 reflectors applied last to first."""
    X = Y.clone()
    for s, V, T in reversed(reflectors):
        X[s:].addmm_(V, T @ (V.T @ X[s:]), alpha=-1.0)
    return X


def lower_band_storage(lower: torch.Tensor, bandwidth: int) -> np.ndarray:
    """LAPACK's lower band storage of the banded matrix in `lower` (float64): row d = sub-diagonal d."""
    h = lower.shape[0]
    band = np.zeros((bandwidth + 1, h))
    for d in range(bandwidth + 1):
        band[d, : h - d] = torch.diagonal(lower, -d).double().numpy()
    return band


def band_times(band: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """B Y for the symmetric banded B in lower band storage."""
    h = band.shape[1]
    out = band[0, :, None] * Y
    for d in range(1, band.shape[0]):
        out[d:] += band[d, : h - d, None] * Y[: h - d]
        out[: h - d] += band[d, : h - d, None] * Y[d:]
    return out


def _shifted_band_lu(band: np.ndarray, shift: float):
    """LU (LAPACK gbtrf, partial pivoting) of B - shift I, B symmetric banded in lower band storage."""
    from scipy.linalg import lapack

    b, h = band.shape[0] - 1, band.shape[1]
    general = np.zeros((3 * b + 1, h), order="F")  # gbtrf layout: A[i, j] at row 2b + i - j
    for d in range(b + 1):
        general[2 * b + d, : h - d] = band[d, : h - d]
        if d:
            general[2 * b - d, d:] = band[d, : h - d]
    general[2 * b] -= shift
    lu, pivots, info = lapack.dgbtrf(general, b, b, overwrite_ab=1)
    return lu, pivots, info


def _shift_beside(descending: np.ndarray, index: int) -> float:
    """A shift for eigenvalue `index`: a quarter of the gap below it (above it for the last one). On
    the eigenvalue itself, inverse iteration would blow that one direction up by 1 / rounding and
    drown the rest of the block in it; a quarter gap off, it still grows fastest."""
    if index + 1 < len(descending):
        return descending[index] - 0.25 * (descending[index] - descending[index + 1])
    if index > 0:
        return descending[index] + 0.25 * (descending[index - 1] - descending[index])
    return descending[index]


def _run_filter(band: np.ndarray, descending: np.ndarray, a: int, b: int, lo: int, hi: int):
    r"""The faster of two iterations that make the run [a, b) dominate a block spanning window [lo, hi):
    `step(k, Y)` applies step k (1, 2, ...) to Y, or None if the band solver fails.

      inverse   Y <- (B - s_i I)^{-1} Y with s_i beside run eigenvalue i, i = a .. b-1 in turn: over
                one cycle a run eigenvalue l grows against an outside one o by prod_i |o - s_i| / |l - s_i|
      power     (windows at the top only) Y <- (B - c I) Y, c the centre of the eigenvalues below the
                window: l grows against o by |l - c| / |o - c| per step; better where the run's
                eigenvalues stand far apart, as at the top of a decaying spectrum
    Both rates are known from the eigenvalues, worst case over the run and the nearest outside
    eigenvalues (each side), so the choice is made before iterating.
    """
    from scipy.linalg import lapack

    h = len(descending)
    run = descending[a:b]
    outside = np.array([descending[i] for i in (lo - 1, hi) if 0 <= i < h])
    if outside.size == 0:  # the window is the whole spectrum: any basis of it will do
        return lambda step, Y: Y
    shifts = np.array([_shift_beside(descending, i) for i in range(a, b)])

    def growth(values: np.ndarray) -> np.ndarray:  # over one cycle of inverse steps
        return np.prod(1.0 / np.abs(values[:, None] - shifts[None, :]), axis=1)

    inverse_rate = (growth(outside).max() / growth(run).min()) ** (1.0 / len(shifts))
    power_rate = np.inf
    if lo == 0:
        centre = 0.5 * (descending[hi] + descending[h - 1])
        power_rate = 0.5 * (descending[hi] - descending[h - 1]) / np.abs(run - centre).min()
    if power_rate < inverse_rate:
        return lambda step, Y: band_times(band, Y) - centre * Y
    bandwidth = band.shape[0] - 1
    factors = []
    for shift in shifts:
        lu, pivots, info = _shifted_band_lu(band, shift)
        if info != 0:  # an exactly singular U
            return None
        factors.append((lu, pivots))

    def inverse_step(step: int, Y: np.ndarray) -> np.ndarray | None:
        lu, pivots = factors[(step - 1) % len(factors)]
        solution, info = lapack.dgbtrs(lu, bandwidth, bandwidth, Y, pivots)
        return solution if info == 0 else None

    return inverse_step


def _band_window_eigenvectors(
    W: torch.Tensor, wide: bool, windows: list[tuple[int, int, int, int]]
) -> list[tuple[torch.Tensor, int]] | None:
    r"""For each window: eigenvectors of G around its run [a, b) and how many of them lie above it.

    Block iteration, the block as wide as the window, with the faster of shifted inverse iteration and
    (at the top) shifted power iteration (_run_filter). The run converges fast; the eigenvalues at the
    block's edge barely converge, and Rayleigh-Ritz can mix an edge vector above the run with one
    below into a Ritz pair whose value lies anywhere, the run included. Such a pair has a large
    residual ||B y - theta y||. So the run's pairs must have theta between the midpoints to its
    neighbouring eigenvalues and a residual below RUN_TOLERANCE eps times its gap; other pairs are
    kept only if their residual is below half their distance from the run, and the kept ones above
    the run place it for the Ritz step on W. A run that does not settle within SHIFT_MAX_ITERATIONS
    (also when an eigenvalue repeats exactly across the run's boundary) gives None: the caller then
    takes the one-stage route. Runs with torch's threads.
    """
    from scipy.linalg import eig_banded
    from threadpoolctl import threadpool_limits

    h = W.shape[0] if wide else W.shape[1]
    bandwidth = band_width(h)
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        lower = gram_block_triangle(W, wide, upper=False)
        reflectors = band_reduce_(lower, bandwidth)
        band = lower_band_storage(lower, bandwidth)
        del lower
        descending = eig_banded(band, lower=True, eigvals_only=True)[::-1]
        generator = np.random.default_rng(0)
        precision = torch.finfo(W.dtype).eps
        noise = 1e-13 * abs(descending[0])  # float64 work on B: residuals reach ~1e-15 ||B||
        kept_vectors, above_counts = [], []
        for a, b, lo, hi in windows:
            step_once = _run_filter(band, descending, a, b, lo, hi)
            if step_once is None:
                return None
            Y = generator.standard_normal((h, hi - lo))  # the window's width
            # the run [a, b) is settled when its Ritz pairs are there and converged (angle ~ residual / gap)
            top = np.inf if a == 0 else 0.5 * (descending[a - 1] + descending[a])
            bottom = -np.inf if b == h else 0.5 * (descending[b - 1] + descending[b])
            gaps = [descending[a - 1] - descending[a]] if a > 0 else []
            gaps += [descending[b - 1] - descending[b]] if b < h else []
            run_tolerance = max(RUN_TOLERANCE * precision * min(gaps, default=abs(descending[0])), noise)
            for step in range(1, SHIFT_MAX_ITERATIONS + 1):
                Y = step_once(step, Y)
                if Y is None:
                    return None
                Y = np.linalg.qr(Y)[0]
                if step < SHIFT_ITERATIONS:
                    continue
                BY = band_times(band, Y)
                theta, Z = np.linalg.eigh(Y.T @ BY)
                ritz = Y @ Z
                residuals = np.linalg.norm(BY @ Z - ritz * theta, axis=0)
                run = (theta < top) & (theta >= bottom) & (residuals <= run_tolerance)
                if int(run.sum()) == b - a:
                    break
            else:
                return None
            # Other pairs count only when clearly on one side of the run: an edge vector mixed from
            # both sides can have its Ritz value anywhere, but then its residual is large.
            distance = np.maximum(theta - descending[a], descending[b - 1] - theta)
            keep = run | (residuals < 0.5 * distance)
            kept_vectors.append(ritz[:, keep])
            above_counts.append(int((keep & ~run & (theta > descending[a])).sum()))
    widths = [vectors.shape[1] for vectors in kept_vectors]
    stacked = torch.from_numpy(np.concatenate(kept_vectors, axis=1)).to(W.dtype)
    bases = apply_band_reflectors(reflectors, stacked).split(widths, dim=1)
    return list(zip(bases, above_counts))


# ---- Rayleigh-Ritz --------------------------------------------------------------------------------


def _windowed_ritz(
    W: torch.Tensor, windows: list[tuple[int, int, int, int]], bases: list[tuple[torch.Tensor, int]], wide: bool
):
    """U (m, K), S (K,), V (n, K) for the wanted descending indices, from each window's eigenvectors
    (h, w) of W's smaller Gram matrix, refined by Rayleigh-Ritz in the window. The run [a, b) is
    taken at its place among the window's Ritz values: after the `above` ones that lie above it."""
    out_dtype = W.dtype
    # One matmul for all windows: W Q (tall) or W^T Q (wide), Q orthonormalised in float64.
    orthonormal = [torch.linalg.qr(Q.double())[0] for Q, _ in bases]
    stacked = torch.cat(orthonormal, dim=1).to(out_dtype)  # (h, sum w)
    projected = (W.T @ stacked if wide else W @ stacked).double()  # (n or m, sum w)
    Us, Ss, Vs, start = [], [], [], 0
    for (a, b, _, _), Q, (_, above) in zip(windows, orthonormal, bases):
        width = Q.shape[1]
        small_U, small_S, small_Vh = accurate_svd(projected[:, start : start + width])
        start += width
        keep = slice(above, above + b - a)
        long_side, short_side = small_U[:, keep], Q @ small_Vh[keep].T  # long: W's other side
        Ss.append(small_S[keep])
        if wide:  # Q spans left singular vectors (m side); W^T Q = V diag(S) (Q^T U)^T
            Us.append(short_side), Vs.append(long_side)
        else:
            Us.append(long_side), Vs.append(short_side)
    U, S, V = torch.cat(Us, 1), torch.cat(Ss), torch.cat(Vs, 1)
    return U.to(out_dtype), S.to(out_dtype), V.to(out_dtype)
