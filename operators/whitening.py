"""PCA-whitening, learned on a sample and applied identically to database and queries.

o(u) = P(u − m), P ∈ R^{d×D} from the PCA of the sample (HOW L9317-9333: local descriptors to
d = 128; GeM/PCAw for global descriptors, L2804-2875, Table 2 L3273-3303). With eigen-pairs
(λ_i, e_i) of the sample covariance, row i of P is λ_i^{-s/2} e_iᵀ; s = 1 is plain whitening and
s < 1 the shrinkage variant of the HOW code [ext: ``pcawhitenlearn_shrinkage``].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from operators.state import State


@dataclass
class Whitening:
    mean: np.ndarray  # (D,)
    proj: np.ndarray  # (d, D)

    @property
    def dim(self) -> int:
        return self.proj.shape[0]

    def __call__(self, x: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Whiten rows of ``x`` (N, D) -> (N, d), L2-normalised unless ``normalize=False``."""
        y = (np.asarray(x, np.float32) - self.mean) @ self.proj.T
        if normalize:
            y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y.astype(np.float32)

    def state(self) -> State:
        return State({"mean": self.mean, "proj": self.proj})

    @classmethod
    def from_state(cls, state: State) -> "Whitening":
        mean, proj = state.require("mean", "proj", what="a whitening")
        if mean.ndim != 1 or proj.ndim != 2 or proj.shape[1] != mean.shape[0]:
            raise ValueError(f"a whitening needs mean (D,) and proj (d, D), got {mean.shape} and {proj.shape}")
        return cls(np.asarray(mean, np.float32), np.asarray(proj, np.float32))


def learn_pca_whitening(x: np.ndarray, dim: int, shrinkage: float = 1.0, eps: float = 1e-9) -> Whitening:
    """PCA-whitening to ``dim`` dimensions from samples ``x`` (N, D); ``dim`` is capped at min(N-1, D)."""
    x = np.asarray(x, np.float64)
    n, d_in = x.shape
    if n < 2:
        raise ValueError("PCA-whitening needs at least 2 samples")
    dim = min(dim, d_in, n - 1)
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / n
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1][:dim]
    eigval, eigvec = np.maximum(eigval[order], eps), eigvec[:, order]
    proj = (eigvec * eigval ** (-shrinkage / 2.0)).T
    return Whitening(mean.astype(np.float32), proj.astype(np.float32))


def learn_lw(
    x: np.ndarray,
    positives: np.ndarray,
    negatives: np.ndarray | None,
    dim: int,
    reg: float = 0.0,
    mean: np.ndarray | None = None,
    cov: np.ndarray | None = None,
) -> Whitening:
    """Learned whitening Lw from matching and non-matching pairs (GeM paper L2804-2875, spec repr. §6).

    C_S = mean over positive pairs of (f_i − f_j)(f_i − f_j)ᵀ, C_D the same over negative pairs;
    P = eig(C_S^{-1/2} C_D C_S^{-1/2})ᵀ C_S^{-1/2}, keeping the ``dim`` largest eigenvalues, applied as
    P(f − μ) with μ the mean descriptor of ``x``. So P C_S Pᵀ = I (matching pairs are whitened) and
    P C_D Pᵀ is diagonal, largest first (non-matching differences are stretched). ``positives`` /
    ``negatives`` are (p, 2) row indices into ``x``. With fewer pairs than dimensions C_S is singular:
    ``reg`` > 0 adds reg · tr(C_S)/D to its diagonal [ours]. ``negatives=None`` takes random pairs of the
    collection as the non-matching ones: C_D = E[(f_i − f_j)(f_i − f_j)ᵀ] = 2 Σ, with ``cov`` Σ the
    covariance of all descriptors (as cirtorch's ``whitenlearn`` does [ext]); ``mean`` μ when ``x`` is
    a sample.
    """
    x = np.asarray(x, np.float64)
    d_in = x.shape[1]

    def scatter(pairs: np.ndarray) -> np.ndarray:
        diff = x[pairs[:, 0]] - x[pairs[:, 1]]
        return diff.T @ diff / max(len(diff), 1)

    cs = scatter(np.asarray(positives))
    cd = scatter(np.asarray(negatives)) if negatives is not None else 2.0 * np.asarray(cov, np.float64)
    cs += reg * np.trace(cs) / d_in * np.eye(d_in)
    val, vec = np.linalg.eigh(cs)
    inv_sqrt = (vec / np.sqrt(np.maximum(val, 1e-12))) @ vec.T
    val2, vec2 = np.linalg.eigh(inv_sqrt @ cd @ inv_sqrt)
    top = np.argsort(val2)[::-1][: min(dim, d_in)]
    proj = vec2[:, top].T @ inv_sqrt
    mu = x.mean(axis=0) if mean is None else np.asarray(mean, np.float64)
    return Whitening(mu.astype(np.float32), proj.astype(np.float32))
