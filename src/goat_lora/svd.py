r"""The singular components GOAT initialises its experts from.

Only d components at E places of the spectrum are needed, so besides the exact SVD there is a
faster route through the smaller Gram matrix, batched over matrices of equal shape:

    exact  torch.linalg.svd of W (float32; float64 for a float64 weight), one matrix at a time.
           This is what the public GOAT code does.
    gram   h = min(m, n);  the h x h Gram matrix  G = W^T W (m >= n)  or  W W^T (m < n)  is
           symmetric with eigenvalues S^2 and eigenvectors V (resp. U):  one batched eigh for all
           matrices of a shape, then the other side from one thin matmul, U = W V diag(1/S).
           It works in float32 for float32 / bf16 / fp16 weights (float64 for float64 weights).
    auto   "exact" for layers of at most AUTO_EXACT_MAX_ELEMENTS elements, "gram" above.

Why "auto" draws the line there: for small layers (every layer of MiniLM or SmolLM2-135M) the
exact SVD costs milliseconds and is as accurate as float32 allows, so there is nothing to win. For
large ones the Gram route is faster: on 2 CPU cores one LLaMA-2-7B layer took 157 s against 398 s
for the exact SVD (2.5x, docs/benchmarks.md), because it reduces one h x h symmetric matrix instead
of bidiagonalising the m x n one and never forms singular vectors of the long side; on a GPU
cuSOLVER's eigh is much faster than its SVD (8.7x on an H100; the GPU figures' accuracy is still
to be re-checked, see docs/benchmarks.md). Its price would be accuracy for
small singular values: squaring W squares its condition number, so the float32 eigh alone perturbs
the vector of sigma_i by about eps_32 sigma_max^2 / (sigma_i^2 - sigma_k^2) instead of
eps_32 sigma_max / |sigma_i - sigma_k|. That error is almost all mixing with spectral neighbours,
which the Rayleigh-Ritz window removes: after it, each expert's subspace agrees with the float32
SVD's to a few hundredths of a degree (tests/test_svd.py; docs/benchmarks.md). Whichever route,
the residual W_res is built from the same factors as the experts, so the adapted model equals the
pretrained one at k = E exactly.

Computation runs on the weight's device, or on CUDA when the weight is on the CPU and a GPU is
present; results come back on the weight's device.
"""

from __future__ import annotations

import torch

from .config import SvdMethod

# Below this many elements an exact SVD is cheap enough (a few ms) and "auto" uses it.
AUTO_EXACT_MAX_ELEMENTS = 1024 * 1024
# Rayleigh-Ritz window: spectral neighbours on each side of a wanted run (see gram_singular_components).
RITZ_MARGIN = 16
# Largest number of Gram matrices eigendecomposed in one batched call (bounds memory).
MAX_GRAM_BATCH_ELEMENTS = 8 * 4096 * 4096


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
       One batched float32 eigh for all N matrices.
    2. Rayleigh-Ritz in a window: float32 eigenvectors of G are mixed mostly with their spectral
       neighbours (error ~ eps sigma_max^2 / (sigma_i^2 - sigma_k^2)), so for each run of wanted
       indices [a, b) take the eigenvectors of [a - margin, b + margin), orthonormalise them (Q),
       and take the SVD of the thin W Q (m x w): its singular triplets, rotated back by Q, are the
       wanted ones with the neighbours' mixing removed. Costs one m x n x (K + 2 margin E) matmul.
    """
    margin = RITZ_MARGIN if margin is None else margin
    rows, cols = weights[0].shape
    wide = rows < cols
    device = compute_device(weights[0])
    dtype = _work_dtype(weights[0])
    work = [w.detach().to(device=device, dtype=dtype) for w in weights]
    grams = torch.stack([w @ w.T if wide else w.T @ w for w in work])  # (N, h, h)
    if device.type == "cpu":  # LAPACK syevd per matrix, the batch spread over the cores
        eigvecs = torch.linalg.eigh(grams).eigenvectors  # ascending eigenvalues
    else:  # one matrix per call: batched CUDA eigh may take cuSOLVER's Jacobi path (see docs/benchmarks.md)
        eigvecs = torch.stack([torch.linalg.eigh(gram).eigenvectors for gram in grams])
    del grams
    out = []
    for i, w in enumerate(work):
        wanted = indices[i].tolist()
        U, S, V = _windowed_ritz(w, eigvecs[i], wanted, margin, wide)
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


def _windowed_ritz(W: torch.Tensor, eigvecs: torch.Tensor, wanted: list[int], margin: int, wide: bool):
    """U (m, K), S (K,), V (n, K) for the descending indices `wanted`, from the ascending
    eigenvectors (h, h) of W's smaller Gram matrix, refined by Rayleigh-Ritz in spectral windows."""
    h = eigvecs.shape[-1]
    out_dtype = W.dtype
    windows = []
    for a, b in _runs(wanted):
        lo, hi = max(0, a - margin), min(h, b + margin)
        positions = torch.arange(h - 1 - lo, h - 1 - hi, -1, device=eigvecs.device)  # descending lo..hi-1
        windows.append((a, b, lo, eigvecs[:, positions]))
    # One matmul for all windows: W Q (tall) or W^T Q (wide), Q orthonormalised in float64.
    bases = [torch.linalg.qr(Q.double())[0] for _, _, _, Q in windows]
    stacked = torch.cat(bases, dim=1).to(out_dtype)  # (h, sum w)
    projected = (W.T @ stacked if wide else W @ stacked).double()  # (n or m, sum w)
    Us, Ss, Vs, start = [], [], [], 0
    for (a, b, lo, _), Q in zip(windows, bases):
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
