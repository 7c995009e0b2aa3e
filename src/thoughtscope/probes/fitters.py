"""Linear probe fitters in plain torch, batched over layers: X [L, N, d], y [N] -> weights W [L, d], bias b [L].

score = x · w + b, positive = class 1. Every fitter is deterministic for a given seed.
- "mean": difference of class means (the default: the most causal direction in Marks & Tegmark);
- "lda": shrunk pooled within-class covariance (Ledoit–Wolf) applied to the mean difference;
- "logistic": L2 logistic regression (L-BFGS in float64 on standardised features), the penalty chosen per layer
  by group-wise cross-validation on the training rows only;
- "lat": RepE's LAT: first singular direction of paired differences whose orientation is shuffled (so centring
  keeps the signal), sign fixed so training positives rank above their negatives;
- "ccs": Burns et al.'s contrast-consistent search on pairs (opt-in comparison; sign fixed with training labels).
Bias for mean/lda/lat: minus the projection of the midpoint of the class means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ProbeError
from .config import DEFAULT_FITTERS, FITTERS  # noqa: F401  (re-exported: their old home)
from .metrics import auroc

C_GRID = (1e-3, 1e-2, 1e-1, 1.0)


def _check(X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if X.dim() == 2:
        X = X[None]
    if X.dim() != 3:
        raise ProbeError(f"activations must be [layers, rows, d] or [rows, d], got shape {tuple(X.shape)}")
    y = torch.as_tensor(y).long()
    if y.shape[0] != X.shape[1]:
        raise ProbeError(f"{X.shape[1]} activation rows but {y.shape[0]} labels")
    if set(y.tolist()) != {0, 1}:
        raise ProbeError(f"labels must contain both classes 0 and 1, got {sorted(set(y.tolist()))}")
    return X.double(), y


def _midpoint_bias(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    mid = 0.5 * (X[:, y == 1].mean(1) + X[:, y == 0].mean(1))
    return -(mid * W).sum(-1)


def fit_mean(X, y, **_) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = _check(X, y)
    W = X[:, y == 1].mean(1) - X[:, y == 0].mean(1)
    return W.float(), _midpoint_bias(X, y, W).float()


def ledoit_wolf(Xc: torch.Tensor) -> torch.Tensor:
    """Shrunk covariance [L, d, d] of centred rows Xc [L, N, d] (Ledoit & Wolf 2004, towards (tr Σ / d)·I)."""
    L, n, d = Xc.shape
    S = Xc.mT @ Xc / n
    mu = S.diagonal(dim1=-2, dim2=-1).mean(-1)  # [L]
    eye = torch.eye(d, dtype=Xc.dtype, device=Xc.device)
    delta = ((S - mu[:, None, None] * eye) ** 2).sum((-2, -1)) / d
    sq = (Xc**2).sum(-1)  # [L, N] row norms squared
    # mean over rows of ||x xᵀ − S||_F², expanded so no [N, d, d] tensor is built
    xsx = ((Xc @ S) * Xc).sum(-1)
    beta = ((sq**2).mean(-1) - 2 * xsx.mean(-1) + (S**2).sum((-2, -1))) / (d * n)
    shrink = (beta.clamp_min(0) / delta.clamp_min(1e-30)).clamp(0, 1)
    return (1 - shrink)[:, None, None] * S + (shrink * mu)[:, None, None] * eye


def fit_lda(X, y, **_) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = _check(X, y)
    mu1, mu0 = X[:, y == 1].mean(1), X[:, y == 0].mean(1)
    Xc = torch.cat([X[:, y == 1] - mu1[:, None], X[:, y == 0] - mu0[:, None]], 1)
    S = ledoit_wolf(Xc)
    # a small ridge keeps a degenerate site solvable (e.g. the embedding of a final "." that every row shares)
    ridge = 1e-6 * S.diagonal(dim1=-2, dim2=-1).mean(-1) + 1e-12
    S = S + ridge[:, None, None] * torch.eye(S.shape[-1], dtype=S.dtype)
    # Cholesky, not LU: S is symmetric positive definite here, and MKL's batched LU solve fails outright once the
    # thread count has been changed in the process (as the atlas build does), which a batch of Choleskys does not
    W = torch.cholesky_solve((mu1 - mu0)[..., None], torch.linalg.cholesky(S)).squeeze(-1)
    return W.float(), _midpoint_bias(X, y, W).float()


def _rotate(Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With fewer rows than features, coordinates in the rows' span (exact: the L2 optimum's w lies there)."""
    if Z.shape[1] >= Z.shape[2]:
        return Z, None
    Q, R = torch.linalg.qr(Z.mT)  # Zᵀ = Q R, so Z Q = Rᵀ
    return R.mT, Q


def _newton(
    Z: torch.Tensor,
    y: torch.Tensor,
    lam: torch.Tensor,
    theta0: torch.Tensor | None = None,
    max_iter: int = 50,
    tol: float = 1e-7,
) -> torch.Tensor:
    """Minimise mean log-loss + lam/2 ||w||² (bias free) for every layer at once by damped Newton steps.

    Written by hand (not L-BFGS) because the layers' problems are solved together: a batched Newton step
    converges in a few iterations for every layer, where one joint L-BFGS crawls at the pace of the worst.
    Returns theta [L, r + 1] (weights then bias).
    """
    L, n, r = Z.shape
    reg = lam[:, None].expand(L, r + 1).clone()
    yf = y.to(Z.dtype).expand(L, n)
    w = torch.full((L, n), 1.0 / n, dtype=Z.dtype)
    return newton_logistic(Z, yf, w, reg, theta0, max_iter=max_iter, tol=tol)


def newton_logistic(
    X: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    reg: torch.Tensor,
    theta0: torch.Tensor | None = None,
    *,
    max_iter: int = 50,
    tol: float = 1e-7,
) -> torch.Tensor:
    """Σᵢ wᵢ·log-loss + ½ Σ reg·θ² for a batch of problems X [P, n, k], y and w [P, n], reg [P or 1, k + 1] (the
    bias's entry is replaced by 1e-12: not penalised), by damped Newton steps with per-problem Armijo backtracking.
    Returns theta [P, k + 1] (weights, then bias)."""
    P, n, k = X.shape
    Za = torch.cat([X, torch.ones(P, n, 1, dtype=X.dtype)], -1)
    reg = reg.expand(P, k + 1).clone()
    reg[:, -1] = 1e-12
    theta = torch.zeros(P, k + 1, dtype=X.dtype) if theta0 is None else theta0.clone()

    def objective(th):
        z = (Za @ th[..., None]).squeeze(-1)
        return (w * (torch.nn.functional.softplus(z) - y * z)).sum(-1) + 0.5 * (reg * th * th).sum(-1)

    f = objective(theta)
    for _ in range(max_iter):
        p = torch.sigmoid((Za @ theta[..., None]).squeeze(-1))
        g = (Za.mT @ (w * (p - y))[..., None]).squeeze(-1) + reg * theta
        if float(g.abs().max()) < tol:
            break
        H = Za.mT @ (Za * (w * p * (1 - p))[..., None]) + torch.diag_embed(reg)
        step = torch.cholesky_solve(g[..., None], torch.linalg.cholesky(H)).squeeze(-1)
        t = torch.ones(P, dtype=X.dtype)
        dec = (g * step).sum(-1)
        for _ls in range(30):  # backtracking per problem (Armijo)
            cand = theta - t[:, None] * step
            fc = objective(cand)
            bad = fc > f - 1e-4 * t * dec
            if not bad.any():
                break
            t = torch.where(bad, t / 2, t)
        theta, f = cand, fc
    return theta


def _unrotate(theta: torch.Tensor, Q: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    w, b = theta[:, :-1], theta[:, -1]
    return ((Q @ w[..., None]).squeeze(-1) if Q is not None else w), b


def logistic_raw(
    X: torch.Tensor, y: torch.Tensor, C: float | torch.Tensor, tol: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's objective C·Σ log-loss + ½‖w‖² on the given features, for every layer (no standardising)."""
    X, y = _check(X, y)
    n = X.shape[1]
    lam = 1.0 / (torch.as_tensor(C, dtype=torch.float64) * n) * torch.ones(X.shape[0], dtype=torch.float64)
    Z, Q = _rotate(X)
    return _unrotate(_newton(Z, y, lam, tol=tol), Q)


def _standardise(X: torch.Tensor):
    """Centre, and scale by one number per layer (the RMS deviation): an isotropic rescaling keeps the geometry
    (per-feature scaling would bend the L2 penalty towards high-variance features) and makes C comparable."""
    mu = X.mean(1, keepdim=True)
    sd = (X - mu).pow(2).mean((1, 2), keepdim=True).sqrt().clamp_min(1e-8).expand(-1, 1, X.shape[2])
    return (X - mu) / sd, mu.squeeze(1), sd.squeeze(1)


def fit_logistic(
    X, y, *, folds: Sequence[tuple[list[int], list[int]]] | None = None, C=None, **_
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """L2 logistic on centred, rescaled features; C per layer by cross-validated AUROC over `folds` (indices into
    these training rows, so the held-out split is never seen), warm-started along the C grid."""
    X, y = _check(X, y)
    L = X.shape[0]
    cv_best = None
    if C is not None:
        chosen = torch.as_tensor(C, dtype=torch.float64).expand(L).clone()
    elif folds:
        cv = torch.zeros(len(C_GRID), L, dtype=torch.float64)
        for tr, va in folds:
            tr_t, va_t = torch.tensor(tr), torch.tensor(va)
            if len(set(y[tr_t].tolist())) < 2 or len(set(y[va_t].tolist())) < 2:
                continue
            Z, mu, sd = _standardise(X[:, tr_t])
            Zr, Q = _rotate(Z)
            theta = None
            for k, c in enumerate(C_GRID):
                theta = _newton(Zr, y[tr_t], torch.full((L,), 1 / (c * len(tr)), dtype=torch.float64), theta)
                w, b = _unrotate(theta, Q)
                s = (((X[:, va_t] - mu[:, None]) / sd[:, None]) @ w[..., None]).squeeze(-1)
                cv[k] += auroc(s, y[va_t])
        chosen = torch.tensor(C_GRID, dtype=torch.float64)[cv.argmax(0)]
        cv_best = (cv.max(0).values / len(folds)).tolist()
    else:
        chosen = torch.full((L,), 1.0, dtype=torch.float64)
    Z, mu, sd = _standardise(X)
    Zr, Q = _rotate(Z)
    w, b = _unrotate(_newton(Zr, y, 1 / (chosen * X.shape[1])), Q)
    W = w / sd
    bias = b - (W * mu).sum(-1)
    info = {"C": chosen.tolist()}
    if cv_best is not None:
        info["cv_auroc"] = cv_best  # mean fold AUROC of the chosen C: training rows only
    return W.float(), bias.float(), info


def _orient(X: torch.Tensor, y: torch.Tensor, pairs: list[tuple[int, int]], W: torch.Tensor) -> torch.Tensor:
    """Flip each layer's direction so that the positive member of more training pairs scores higher."""
    if pairs:
        p = torch.tensor([a for a, _ in pairs])
        q = torch.tensor([b for _, b in pairs])
        margin = ((X[:, p] - X[:, q]) * W[:, None]).sum(-1)
        sign = torch.where((margin > 0).double().mean(1) >= 0.5, 1.0, -1.0)
    else:
        s = (X @ W[..., None]).squeeze(-1)
        sign = torch.where(auroc(s, y) >= 0.5, 1.0, -1.0)
    return W * sign[:, None].to(W.dtype)


def _pairs_or_random(y: torch.Tensor, pairs, seed: int) -> list[tuple[int, int]]:
    if pairs:
        return list(pairs)
    g = torch.Generator().manual_seed(seed)
    pos = (y == 1).nonzero().squeeze(1)
    neg = (y == 0).nonzero().squeeze(1)
    pos, neg = pos[torch.randperm(len(pos), generator=g)], neg[torch.randperm(len(neg), generator=g)]
    m = min(len(pos), len(neg))
    return list(zip(pos[:m].tolist(), neg[:m].tolist()))


def _paired(X, y, pairs, seed: int, method: str):
    """A pair-based fitter's inputs: (X, y, pairs, positive rows, negative rows), with at least 2 pairs."""
    X, y = _check(X, y)
    pr = _pairs_or_random(y, pairs, seed)
    if len(pr) < 2:
        raise ProbeError(f"{method} needs at least 2 (positive, negative) pairs in the training split, got {len(pr)}")
    return X, y, pr, torch.tensor([a for a, _ in pr]), torch.tensor([b for _, b in pr])


def fit_lat(X, y, *, pairs: Sequence[tuple[int, int]] | None = None, seed: int = 0, **_):
    """pairs: (positive row, negative row) among the training rows; without them, random pos/neg pairs (RepE)."""
    X, y, pr, p, q = _paired(X, y, pairs, seed, "LAT")
    g = torch.Generator().manual_seed(seed)
    flip = torch.where(torch.rand(len(pr), generator=g) < 0.5, -1.0, 1.0).double()
    D = (X[:, p] - X[:, q]) * flip[None, :, None]
    D = D - D.mean(1, keepdim=True)
    W = torch.linalg.svd(D, full_matrices=False)[2][:, 0]  # [L, d], unit
    W = _orient(X, y, pr, W)
    return W.float(), _midpoint_bias(X, y, W).float()


def fit_ccs(
    X, y, *, pairs: Sequence[tuple[int, int]] | None = None, seed: int = 0, steps: int = 300, restarts: int = 3, **_
):
    """Contrast-consistent search on pairs: unsupervised loss, best of a few restarts, sign from the labels."""
    X, y, pr, p, q = _paired(X, y, pairs, seed, "CCS")
    # Hide which member is the positive (CCS is unsupervised): with label-ordered halves, centring each half
    # would subtract the very difference we look for.
    swap = torch.rand(len(pr), generator=torch.Generator().manual_seed(seed + 1)) < 0.5
    p, q = torch.where(swap, q, p), torch.where(swap, p, q)

    def norm(H):
        H = H - H.mean(1, keepdim=True)
        return H / H.norm(dim=-1).mean(1)[:, None, None].clamp_min(1e-8) * math.sqrt(H.shape[-1])

    A, B = norm(X[:, p]).float(), norm(X[:, q]).float()
    L, _, d = A.shape
    g = torch.Generator().manual_seed(seed)
    best_w, best_b = torch.zeros(L, d), torch.zeros(L)
    best_loss = torch.full((L,), float("inf"))
    for _r in range(restarts):
        w = (torch.randn(L, d, generator=g) / math.sqrt(d)).requires_grad_(True)
        b = torch.zeros(L, requires_grad=True)
        opt = torch.optim.AdamW([w, b], lr=1e-2, weight_decay=0.01)
        with torch.enable_grad():
            for _s in range(steps):
                pa = torch.sigmoid((A @ w[..., None]).squeeze(-1) + b[:, None])
                pb = torch.sigmoid((B @ w[..., None]).squeeze(-1) + b[:, None])
                loss = ((pa - (1 - pb)) ** 2).mean(1) + (torch.minimum(pa, pb) ** 2).mean(1)
                opt.zero_grad()
                loss.sum().backward()
                opt.step()
        better = loss.detach() < best_loss
        best_loss = torch.where(better, loss.detach(), best_loss)
        best_w[better], best_b[better] = w.detach()[better], b.detach()[better]
    W = _orient(X, y, pr, best_w.double())
    return W.float(), _midpoint_bias(X, y, W).float()


def fit(method: str, X, y, **kw) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Dispatch by name; returns (W [L, d], b [L], info)."""
    if method not in FITTERS:
        raise ProbeError(f"unknown fitter {method!r}: expected one of {', '.join(FITTERS)}")
    fitter = {"mean": fit_mean, "lda": fit_lda, "logistic": fit_logistic, "lat": fit_lat, "ccs": fit_ccs}[method]
    out = fitter(X, y, **kw)
    return out if len(out) == 3 else (*out, {})
