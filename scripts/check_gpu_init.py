"""Check the GPU path of goat_lora.svd against a float64 QR-based SVD (gesvd), on LLaMA-2-7B shapes.

Prints, per shape: time of the GPU Gram route, the largest principal angle (degrees) between each
expert's d-dimensional left subspace from goat_lora and from the float64 reference, and the
relative error of U_j S_j V_j^T. Usage: python scripts/check_gpu_init.py
"""

import time

import torch

from goat_lora import functional as F
from goat_lora.svd import singular_components


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    torch.manual_seed(0)
    E, d = 8, 4
    for m, n in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        W = torch.empty(m, n)
        torch.nn.init.kaiming_uniform_(W, a=5**0.5)
        Wc = W.cuda()
        idx = F.expert_component_indices("goat", min(m, n), E, d).reshape(-1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        U, S, V = singular_components(Wc, idx, "gram")
        torch.cuda.synchronize()
        gram_s = time.perf_counter() - t
        Ur, Sr, Vhr = torch.linalg.svd(Wc.double(), full_matrices=False, driver="gesvd")
        Ur, Sr, Vr = Ur[:, idx.cuda()], Sr[idx.cuda()], Vhr[idx.cuda()].T
        worst_angle, worst_err = 0.0, 0.0
        for j in range(E):
            sl = slice(j * d, (j + 1) * d)
            cos = torch.linalg.svdvals(U[:, sl].double().T @ Ur[:, sl]).clamp(max=1).min()
            worst_angle = max(worst_angle, float(torch.rad2deg(torch.arccos(cos))))
            A = (U[:, sl].double() * S[sl].double()) @ V[:, sl].double().T
            R = (Ur[:, sl] * Sr[sl]) @ Vr[:, sl].T
            worst_err = max(worst_err, float((A - R).norm() / R.norm()))
        gaps = (Sr[:-1] - Sr[1:]).abs().min() if len(Sr) > 1 else 0
        print(
            f"{m}x{n}: gram on GPU {gram_s:.2f}s | max principal angle {worst_angle:.4f} deg | "
            f"max rel err {worst_err:.2e} | S ref first/last {float(Sr[0]):.4f}/{float(Sr[-1]):.4f} "
            f"min gap {float(gaps):.2e}"
        )


if __name__ == "__main__":
    main()
