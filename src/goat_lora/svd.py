r"""The singular components GOAT initialises its experts from.

Only d components at E places of the spectrum are needed, so besides the exact SVD there is a
faster route through the smaller Gram matrix:

    exact  torch.linalg.svd of W (float32; float64 for a float64 weight), one matrix at a time.
           This is what the public GOAT code does.
    gram   h = min(m, n);  the h x h Gram matrix  G = W^T W (m >= n)  or  W W^T (m < n)  is
           symmetric with eigenvalues S^2 and eigenvectors V (resp. U). Only the eigenvectors in a
           window around each wanted run are computed (on the CPU through LAPACK: tridiagonal
           reduction, bisection and inverse iteration for the chosen eigenvalues; on a GPU one
           batched eigh), then a Rayleigh-Ritz step on W itself gives the singular triplets.
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
        raise ValueError(f"batched_singular_components needs weights of one shape, got {[tuple(w.shape) for w in weights]}")
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


def _exact(weight: torch.Tensor, indices: torch.Tensor):
    device = compute_device(weight)
    W = weight.detach().to(device=device, dtype=_work_dtype(weight))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    idx = indices.to(device)
    return U[:, idx].to(weight.device), S[idx].to(weight.device), Vh[idx, :].T.to(weight.device)


def gram_singular_components(
    weights: list[torch.Tensor], indices: torch.Tensor, margin: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    r"""The Gram route for equal-shape weights (m, n); `indices` (N, K) into the descending spectrum.

    1. n <= m: G = W^T W = V diag(S^2) V^T (n x n, symmetric); m < n: G = W W^T = U diag(S^2) U^T.
    2. Eigenvectors of G only in spectral windows: for each run of wanted indices [a, b) the window
       [a - margin, b + margin). On the CPU LAPACK computes just those (_lapack_window_eigenvectors);
       on a GPU (or without SciPy) one batched eigh computes all of them and the windows are sliced.
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
    bases: list[list[torch.Tensor] | None] = [None] * len(work)
    if device.type == "cpu" and lapack_available():
        bases = [_lapack_window_eigenvectors(w, wide, win) for w, win in zip(work, windows)]
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
            bases[i] = [descending[:, lo:hi] for _, _, lo, hi in windows[i]]
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


def gram_lower_column_major(W: torch.Tensor, wide: bool) -> np.ndarray:
    """The lower triangle of W's smaller Gram matrix in a column-major array, which is all that
    LAPACK's sytrd(lower) reads. Only blocks on and above the diagonal of the row-major buffer (on
    and below it in column-major order) are multiplied: about half the flops of W^T W."""
    X = W.T if wide else W  # (long side, h); G = X^T X
    h = X.shape[1]
    upper = torch.zeros(h, h, dtype=X.dtype)  # row-major upper triangle == column-major lower triangle
    for start in range(0, h, GRAM_BLOCK):
        stop = min(h, start + GRAM_BLOCK)
        upper[start:stop, start:] = X[:, start:stop].T @ X[:, start:]
    return upper.numpy().T  # the same memory, read column-major


def _lapack_window_eigenvectors(
    W: torch.Tensor, wide: bool, windows: list[tuple[int, int, int, int]]
) -> list[torch.Tensor] | None:
    r"""Eigenvectors of G spanning each window [lo, hi) of the descending spectrum, without the others.

    A dense eigh spends most of its time on all h eigenvectors; here only the few wanted are formed:
      sytrd   G = Q T Q^T, T tridiagonal, Q = H_1 ... H_{h-1} kept as Householder reflectors
      stebz   the window's eigenvalues of T by bisection (to full accuracy, which stein needs)
      stein   their eigenvectors z of T by inverse iteration
      ormqr   x = Q z: reflector i acts on rows i+1.. and is stored below the subdiagonal, which is
              the QR (geqrf) layout of the trailing (h-1) x (h-1) block, so torch.ormqr applies it.
    LAPACK runs with torch's thread count. Returns None if LAPACK reports a failure (the caller
    then uses the dense eigh).
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
    return list(Z.split([hi - lo for _, _, lo, hi in windows], dim=1))


# ---- Rayleigh-Ritz --------------------------------------------------------------------------------


def _windowed_ritz(
    W: torch.Tensor, windows: list[tuple[int, int, int, int]], bases: list[torch.Tensor], wide: bool
):
    """U (m, K), S (K,), V (n, K) for the wanted descending indices, from each window's eigenvectors
    (h, hi - lo) of W's smaller Gram matrix, refined by Rayleigh-Ritz in the window."""
    out_dtype = W.dtype
    # One matmul for all windows: W Q (tall) or W^T Q (wide), Q orthonormalised in float64.
    orthonormal = [torch.linalg.qr(Q.double())[0] for Q in bases]
    stacked = torch.cat(orthonormal, dim=1).to(out_dtype)  # (h, sum w)
    projected = (W.T @ stacked if wide else W @ stacked).double()  # (n or m, sum w)
    Us, Ss, Vs, start = [], [], [], 0
    for (a, b, lo, _), Q in zip(windows, orthonormal):
        width = Q.shape[1]
        small_U, small_S, small_Vh = torch.linalg.svd(projected[:, start : start + width], full_matrices=False)
        start += width
        keep = slice(a - lo, b - lo)
        long_side, short_side = small_U[:, keep], Q @ small_Vh[keep].T  # long: W's other side
        Ss.append(small_S[keep])
        if wide:  # Q spans left singular vectors (m side); W^T Q = V diag(S) (Q^T U)^T
            Us.append(short_side), Vs.append(long_side)
        else:
            Us.append(long_side), Vs.append(short_side)
    U, S, V = torch.cat(Us, 1), torch.cat(Ss), torch.cat(Vs, 1)
    return U.to(out_dtype), S.to(out_dtype), V.to(out_dtype)
