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

Why "auto" draws the line there: for small layers the exact SVD costs milliseconds and is as
accurate as float32 allows. For large ones the Gram route is 2-3x faster on a CPU (tridiagonal
reduction of one h x h symmetric matrix instead of a bidiagonal one of the m x n matrix, plus no
singular vectors for the long side), and on a GPU cuSOLVER's eigh is much faster than its SVD.
Its price is accuracy for the smallest singular values: squaring W squares its condition number,
so a component with singular value sigma_i has its vector perturbed by about
eps_32 * sigma_max^2 / (sigma_i^2 - sigma_{i+1}^2) instead of eps_32 * sigma_max / (sigma_i - sigma_{i+1}).
Measured on 7B-shaped random layers and on realistic decaying spectra (tests/test_svd.py,
docs/benchmarks.md) each expert's subspace is within a fraction of a degree of the exact SVD's,
which is far below what training moves it. Whichever route, the residual W_res is built from the
same factors as the experts, so the adapted model equals the pretrained one at k = E exactly.

Computation runs on the weight's device, or on CUDA when the weight is on the CPU and a GPU is
present; results come back on the weight's device.
"""

from __future__ import annotations

import torch

from .config import SvdMethod

# Below this many elements an exact SVD is cheap enough (a few ms) and "auto" uses it.
AUTO_EXACT_MAX_ELEMENTS = 1024 * 1024
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
    weights: list[torch.Tensor], indices: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    r"""The Gram route for equal-shape weights (m, n); `indices` (N, K) into the descending spectrum.

    n <= m:  W^T W = V diag(S^2) V^T  (n x n, symmetric: eigh),  U = W V diag(1/S).
    m <  n:  W W^T = U diag(S^2) U^T  (m x m),                   V = W^T U diag(1/S).
    """
    rows, cols = weights[0].shape
    wide = rows < cols
    device = compute_device(weights[0])
    dtype = _work_dtype(weights[0])
    work = [w.detach().to(device=device, dtype=dtype) for w in weights]
    grams = torch.stack([w @ w.T if wide else w.T @ w for w in work])  # (N, h, h)
    eigvals, eigvecs = torch.linalg.eigh(grams)  # ascending
    del grams
    h = eigvals.shape[-1]
    idx = (h - 1 - indices).to(device)  # descending index -> ascending position, (N, K)
    S = eigvals.gather(-1, idx).clamp_min(0.0).sqrt()  # (N, K)
    side = eigvecs.gather(-1, idx[:, None, :].expand(-1, h, -1))  # (N, h, K)
    del eigvecs
    tiny = torch.finfo(dtype).tiny
    inv_S = torch.where(S > 0, 1.0 / S.clamp_min(tiny), torch.zeros_like(S))
    out = []
    for i, w in enumerate(work):
        other = (w.T @ side[i] if wide else w @ side[i]) * inv_S[i][None, :]  # (n or m, K)
        U, V = (side[i], other) if wide else (other, side[i])
        target = weights[i].device
        out.append((U.to(target), S[i].to(target), V.to(target)))
    return out
