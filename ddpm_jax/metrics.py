"""Sample-quality statistics from feature-network outputs: FID, Inception Score and KID.

Pure NumPy in float64; no network, no I/O. The feature network (InceptionV3 pool3 or the digits
classifier) lives in `ddpm_jax.models`; `ddpm_jax.evaluate` glues them together.

  * FID (Heusel et al. 2017): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) between the
    Gaussians fitted to two feature sets.
  * IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over splits.
  * KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3,
    averaged over random subsets.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import scipy.special
from absl import logging


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {features.shape}; "
                         "pass at least two feature vectors.")
    if not np.all(np.isfinite(features)):
        raise ValueError("features contain NaN or inf; check the images fed to the feature net.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm_trace(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """tr((sigma1 sigma2)^{1/2}), retrying with eps I added to both when the product is
    (near-)singular and `sqrtm` returns inf/NaN or a clearly complex root."""
    with warnings.catch_warnings():
        # "Matrix is singular": expected with rank-deficient covariances; the checks below
        # decide whether the root is usable.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        logging.warning("FID: product of covariances is singular; adding %g to the diagonals.",
                        eps)
        offset = np.eye(sigma1.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # The exact root of a product of PSD matrices has a real spectrum; imaginary parts
        # are round-off from near-zero eigenvalues. Large ones mean the inputs are not PSD.
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > 1e-3:
            raise ValueError(f"FID: sqrtm(sigma1 @ sigma2) has imaginary diagonal up to "
                             f"{max_imag:.3g}; are both covariances symmetric PSD? Use more "
                             "samples than feature dimensions.")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     *, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    mu: [D]; sigma: [D, D]. `eps` is added to both diagonals only if the plain matrix square
    root fails (singular covariances, e.g. fewer samples than dimensions).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"Shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 "
                         f"{mu2.shape}, sigma2 {sigma2.shape}; both sets need the same feature "
                         "network (same D).")
    diff = mu1 - mu2
    trace_sqrt = _sqrtm_trace(sigma1, sigma2, eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def inception_score(scores: np.ndarray, *, splits: int = 10,
                    from_logits: bool = True) -> tuple[float, float]:
    """Inception Score: mean and std over `splits` of exp(E_x KL(p(y|x) || p(y))).

    scores: [N, K] logits (`from_logits=True`, softmaxed here in float64) or class
    probabilities (rows summing to 1). Ranges from 1 (every p(y|x) equal) to K (confident
    and uniformly spread over K classes). Splits are contiguous, as in the original code.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] < splits or splits < 1:
        raise ValueError(f"scores must be [N, K] with N >= splits >= 1; got shape "
                         f"{scores.shape} and splits={splits}. Lower `splits` or add samples.")
    if from_logits:
        log_p = scipy.special.log_softmax(scores, axis=1)
        probs = np.exp(log_p)
    else:
        if np.any(scores < 0) or not np.allclose(scores.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError("from_logits=False needs rows of probabilities (>= 0, summing to "
                             "1); pass logits with from_logits=True instead.")
        probs = scores
    values = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # 0 log 0 = 0: `rel_entr` handles the zeros of confident predictions exactly.
        kl = scipy.special.rel_entr(part, np.broadcast_to(marginal, part.shape)).sum(axis=1)
        values.append(np.exp(kl.mean()))
    return float(np.mean(values)), float(np.std(values))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, *,
                              num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over `num_subsets` random subsets of the unbiased MMD^2 estimate.

    features1: [N1, D], features2: [N2, D]. Each subset draws min(subset_size, N1, N2) rows of
    each set without replacement (NumPy RandomState(seed)). Unbiased, so it can be slightly
    negative for identical distributions.
    """
    f1 = np.asarray(features1, dtype=np.float64)
    f2 = np.asarray(features2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features must be [N1, D] and [N2, D]; got {f1.shape} and {f2.shape}.")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got subset size {m}.")
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(num_subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
        off_diag = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(off_diag - 2.0 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))
