"""ReplaceMe's depth pruning, the maths: pure tensor functions, no model and no I/O.

A window of n consecutive blocks [a, a + n) is removed; the hidden states entering it are x_a, those leaving it
x_{a+n}. The window whose angular distance arccos(cos(x_a, x_{a+n}))/π, averaged over calibration tokens, is
smallest goes. The last kept block a − 1 writes x_a = Y + M (Y: its attention-residual stream, M: the output of
its MLP branch); a map T with Y + M·T ≈ x_{a+n} stands in for the window and folds into the module that makes M.
"""

from __future__ import annotations

from dataclasses import dataclass


def angular_distance_sum(x, y) -> float:
    """Σ over rows of arccos(cos(x_r, y_r))/π. x, y: (n, d)."""
    import torch

    x, y = x.double(), y.double()
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-30)
    return float(torch.arccos(cos.clamp(-1.0, 1.0)).sum() / torch.pi)


def choose_windows(distances: dict[int, float], n: int, k: int) -> list[int]:
    """Starts of k windows of n blocks, greedily by smallest distance, in block order. distances: start a → mean
    distance of the window [a, a + n). Windows never touch: each needs its kept block a − 1 to hold its map."""
    chosen: list[int] = []
    for a in sorted(distances, key=lambda s: (distances[s], s)):
        if all(a >= b + n + 1 or b >= a + n + 1 for b in chosen):
            chosen.append(a)
        if len(chosen) == k:
            return sorted(chosen)
    raise ValueError(f"{k} separate windows of {n} blocks do not fit in the {len(distances) + n} blocks")


@dataclass
class MapStats:
    """Sufficient statistics of the least-squares fit of R ≈ M·T (+ b) over token rows, float64.

    MtM: (d, d) MᵀM, MtR: (d, d) MᵀR, m / r: (d,) column sums of M / R, mm / mr / rr: (d,) per-channel Σm², Σm·r,
    Σr², n: rows.
    """

    MtM: object
    MtR: object
    m: object
    r: object
    mm: object
    mr: object
    rr: object
    n: int = 0

    @classmethod
    def zeros(cls, d: int) -> "MapStats":
        import torch

        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(z(d, d), z(d, d), z(d), z(d), z(d), z(d), z(d))

    def add(self, M, R) -> None:
        """Accumulate rows M, R: (n, d)."""
        M, R = M.double(), R.double()
        self.MtM += M.T @ M
        self.MtR += M.T @ R
        self.m += M.sum(0)
        self.r += R.sum(0)
        self.mm += (M * M).sum(0)
        self.mr += (M * R).sum(0)
        self.rr += (R * R).sum(0)
        self.n += M.shape[0]


def full_map(s: MapStats, ridge: float = 1e-4):
    """T: (d, d) = argmin ‖M T − R‖² + λ‖T‖², λ = ridge · mean(diag MᵀM)."""
    import torch

    d = s.MtM.shape[0]
    lam = ridge * float(s.MtM.diagonal().mean())
    return torch.linalg.solve(s.MtM + lam * torch.eye(d, dtype=torch.float64), s.MtR)


def diagonal_map(s: MapStats, bias: bool):
    """(t, b): (d,), (d,) per-channel least squares R_j ≈ t_j M_j (+ b_j); b is zero without `bias`."""
    import torch

    if not bias:
        return s.mr / s.mm.clamp_min(1e-300), torch.zeros_like(s.m)
    n = max(s.n, 1)
    cov = s.mr - s.m * s.r / n
    var = (s.mm - s.m * s.m / n).clamp_min(1e-300)
    t = cov / var
    return t, (s.r - t * s.m) / n


def residual_fraction(s: MapStats, T=None, t=None, b=None) -> float:
    """‖M·T + b − R‖² / ‖R‖² of a fitted map (full T, or diagonal t, b), from the statistics alone; T = t = None:
    no map (M itself, the window simply dropped)."""
    rr = float(s.rr.sum())
    if T is not None:
        # ‖MT − R‖² = tr(TᵀMᵀMT) − 2 tr(TᵀMᵀR) + ‖R‖²
        err = float((T * (s.MtM @ T)).sum() - 2 * (T * s.MtR).sum()) + rr
    elif t is not None:
        b = b if b is not None else 0.0 * t
        err = float((t * t * s.mm + 2 * t * b * s.m + s.n * b * b - 2 * t * s.mr - 2 * b * s.r).sum()) + rr
    else:
        err = float((s.mm - 2 * s.mr).sum()) + rr
    return max(err, 0.0) / max(rr, 1e-300)
