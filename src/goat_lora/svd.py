"""The singular components GOAT initialises its experts from: only d components at E places of the
spectrum are needed, so besides the exact SVD there is a faster route through the Gram matrix."""

from __future__ import annotations

import torch

from .config import SvdMethod


# Below this many elements an exact SVD is cheap enough and "auto" uses it.
AUTO_EXACT_MAX_ELEMENTS = 1024 * 1024


def singular_components(
    weight: torch.Tensor, indices: torch.Tensor, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""U[:, idx] (m, K), S[idx] (K,), V[:, idx] (n, K) of W = U diag(S) V^T for flat `indices`.

    exact: torch.linalg.svd in float32 (float64 when the weight is float64).
    gram:  the eigendecomposition of the smaller Gram matrix (W^T W if m >= n, else W W^T) in
           float64: eigenvalues are S^2, eigenvectors one side; the other side is W V / S.
    The result is float32 (float64 for a float64 weight) whatever the weight's dtype.
    """
    method = SvdMethod(method)
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if method is SvdMethod.AUTO:
        method = SvdMethod.EXACT if weight.numel() <= AUTO_EXACT_MAX_ELEMENTS else SvdMethod.GRAM
    if method is SvdMethod.EXACT:
        U, S, Vh = torch.linalg.svd(weight.to(work_dtype), full_matrices=False)
        return U[:, indices], S[indices], Vh[indices, :].T
    U, S, V = gram_singular_components(weight[None], indices)
    return U[0].to(work_dtype), S[0].to(work_dtype), V[0].to(work_dtype)


def gram_singular_components(
    weights: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Batched Gram-matrix route for a stack of equal-shape weights (N, m, n).

    With n <= m:  W^T W = V diag(S^2) V^T (n x n, symmetric: eigh), U = W V diag(1/S).
    With m < n:   W W^T = U diag(S^2) U^T (m x m), V = W^T U diag(1/S).
    The Gram matrix and eigh run in float64 (squaring W squares its condition number).
    Returns U (N, m, K), S (N, K), V (N, n, K) in float64.
    """
    W = weights.to(torch.float64)
    m, n = W.shape[-2:]
    wide = m < n
    Wt = W.transpose(-1, -2)
    gram = Wt @ W if not wide else W @ Wt  # (N, h, h)
    eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
    order = torch.arange(eigvals.shape[-1] - 1, -1, -1)  # descending, as the SVD orders them
    idx = order[indices]
    S = eigvals[..., idx].clamp_min(0.0).sqrt()  # (N, K)
    side = eigvecs[..., idx]  # (N, h, K)
    inv_S = torch.where(S > 0, 1.0 / S.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(S))
    other = (Wt @ side if wide else W @ side) * inv_S[:, None, :]
    return (side, S, other) if wide else (other, S, side)
