"""Metrics behind every number the book prints for the downstream tasks (Sections 3.2, 3.3).

* Photometric redshifts (Section 3.3, Appendix E.2): the residual Δz, the bias <Δz>, the
  dispersion σ_MAD and the catastrophic-outlier rate η; the 180-bin redshift classes of
  Pasquet et al. (2019) with E(z), the PIT and the CRPS of the binned p(z).
* Galaxy Zoo 2 binary questions (Section 3.2, Appendix C.3): accuracy, precision, recall,
  FPR, AUC and the outlier rate η on "high quality" labels.
* Label efficiency: how many times more labels the supervised model needs (Sections 3.2, 3.3).

Rates the paper prints in percent (both η) are stored here as fractions in [0, 1]; multiply
by 100 to print them. Inputs may be numpy arrays, lists or torch tensors (moved to the
CPU); every result is numpy float64 or a Python number. Bad inputs raise ValueError saying
what is wrong, how often, and where the first case is.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from .constants import PHOTOZ_NBINS, PHOTOZ_ZMAX

log = logging.getLogger(__name__)

#: Largest |sum(p) - 1| accepted for a row of binned p(z); rows are then divided by their sum.
PROB_SUM_TOL = 1e-4
#: 1 / Φ^{-1}(3/4): makes the MAD of a Gaussian an estimate of its standard deviation.
MAD_TO_SIGMA = 1.4826


def _as_array(x) -> np.ndarray:
    """``x`` as a float64 numpy array (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _raise_if(bad: np.ndarray, values: np.ndarray, name: str, what: str) -> None:
    """ValueError naming how many entries of ``values`` are ``what`` and the first of them."""
    if bad.any():
        first = int(np.flatnonzero(bad.ravel())[0])
        raise ValueError(f"{name}: {int(bad.sum())} of {bad.size} values are {what} "
                         f"(first at flat index {first}: {values.ravel()[first].item()!r})")


def _finite(x, name: str) -> np.ndarray:
    x = _as_array(x)
    _raise_if(~np.isfinite(x), x, name, "not finite")
    return x


def _same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


# --------------------------------------------------------------------------- photo-z

def delta_z(z_phot, z_spec) -> np.ndarray:
    """The prediction residual Δz = (z_p - z_s) / (1 + z_s) (Section 3.3)."""
    z_p, z_s = _finite(z_phot, "z_phot"), _finite(z_spec, "z_spec")
    _same_shape(z_p, z_s, "z_phot and z_spec")
    _raise_if(z_s <= -1, z_s, "z_spec", "<= -1 (1 + z_s must be positive)")
    return (z_p - z_s) / (1.0 + z_s)


def photoz_metrics(z_phot, z_spec, outlier: float = 0.05) -> dict[str, float]:
    """The photo-z metrics of Section 3.3 and Figure 4.

    bias: <Δz>, the mean residual.
    sigma_mad: σ_MAD = 1.4826 × median(|Δz - median(Δz)|).
    eta: η, the fraction (the paper prints percent) of catastrophic outliers, |Δz| > ``outlier``
        (strict inequality, as printed).
    n: number of galaxies.
    """
    dz = delta_z(z_phot, z_spec).ravel()
    if dz.size == 0:
        raise ValueError("photoz_metrics: z_phot and z_spec are empty")
    if not outlier > 0:
        raise ValueError(f"photoz_metrics: outlier threshold must be positive, got {outlier}")
    return {
        "bias": float(np.mean(dz)),
        "sigma_mad": float(MAD_TO_SIGMA * np.median(np.abs(dz - np.median(dz)))),
        "eta": float(np.mean(np.abs(dz) > outlier)),
        "n": int(dz.size),
    }


@dataclass(frozen=True)
class RedshiftBins:
    """Equal-width redshift classes on [0, z_max] (Pasquet et al. 2019; Appendix E.2).

    n_bins: number of classes (paper: 180).
    z_max: upper end of the binned range (paper: 0.4), so the width δz = 0.4 / 180 ≈ 2.2e-3.

    A binned p(z) is an ``(N, n_bins)`` array of class probabilities, read as a density that
    is constant within each bin (so its CDF is piecewise linear), zero below 0 and above
    z_max. Rows must be non-negative and sum to 1 within :data:`PROB_SUM_TOL` (a softmax
    does); they are then divided by their sum, so rounding never leaks into E(z), PIT or CRPS.
    """

    n_bins: int = PHOTOZ_NBINS
    z_max: float = PHOTOZ_ZMAX

    def __post_init__(self):
        if int(self.n_bins) != self.n_bins or self.n_bins < 1:
            raise ValueError(f"RedshiftBins: n_bins must be a positive integer, got {self.n_bins}")
        if not (math.isfinite(self.z_max) and self.z_max > 0):
            raise ValueError(f"RedshiftBins: z_max must be positive and finite, got {self.z_max}")

    @property
    def edges(self) -> np.ndarray:
        """Bin edges, ``(n_bins + 1,)``, from 0 to z_max."""
        return np.linspace(0.0, self.z_max, self.n_bins + 1)

    @property
    def centers(self) -> np.ndarray:
        """Bin centres, ``(n_bins,)``."""
        e = self.edges
        return 0.5 * (e[:-1] + e[1:])

    @property
    def width(self) -> float:
        """Bin width δz = z_max / n_bins."""
        return self.z_max / self.n_bins

    def encode(self, z, return_clipped: bool = False):
        """Class index of each redshift: bin k holds edges[k] <= z < edges[k+1].

        z = z_max falls in the last bin. Redshifts above z_max are clipped into the last bin
        (as training labels must be) and counted; with ``return_clipped`` the count is
        returned as ``(indices, n_clipped)``. Negative or non-finite redshifts raise.
        """
        z = _finite(z, "z")
        _raise_if(z < 0, z, "z", "negative (the bins start at z = 0)")
        idx = np.searchsorted(self.edges, z, side="right") - 1
        n_clipped = int(np.count_nonzero(z > self.z_max))
        if n_clipped:
            log.info("RedshiftBins.encode: %d of %d redshifts above z_max = %g clipped into the last bin",
                     n_clipped, z.size, self.z_max)
        idx = np.minimum(idx, self.n_bins - 1).astype(np.int64)
        return (idx, n_clipped) if return_clipped else idx

    def _probs(self, probs) -> np.ndarray:
        """Checked ``(N, n_bins)`` probabilities, each row divided by its sum."""
        p = _finite(probs, "probs")
        if p.ndim != 2 or p.shape[1] != self.n_bins:
            raise ValueError(f"probs must have shape (N, {self.n_bins}), got {p.shape}")
        _raise_if(p < 0, p, "probs", "negative")
        total = p.sum(axis=1)
        _raise_if(np.abs(total - 1) > PROB_SUM_TOL, total, "probs row sums",
                  f"further than {PROB_SUM_TOL:g} from 1 (pass probabilities, not logits)")
        return p / total[:, None]

    def _truth(self, z, n: int) -> np.ndarray:
        z = _finite(z, "z")
        if z.shape != (n,):
            raise ValueError(f"z must have shape ({n},) to match probs, got {z.shape}")
        return z

    def _fraction_below(self, z: np.ndarray) -> np.ndarray:
        """t_k = clip((z - edges[k]) / δz, 0, 1): the part of bin k below z, ``(N, n_bins)``."""
        return np.clip((z[:, None] - self.edges[None, :-1]) / self.width, 0.0, 1.0)

    def expected(self, probs) -> np.ndarray:
        """The photo-z estimate z_p = E(z) = Σ_k p_k × centre_k, ``(N, n_bins) -> (N,)``."""
        return self._probs(probs) @ self.centers

    def cdf(self, probs, z) -> np.ndarray:
        """The PIT: F(z) of each binned p(z) at its true redshift, ``(N, n_bins), (N,) -> (N,)``.

        F is piecewise linear within bins, 0 below z = 0 and 1 above z_max; ``z`` is used as
        given (not clipped), so a true redshift above z_max has PIT 1.
        """
        p = self._probs(probs)
        z = self._truth(z, p.shape[0])
        return np.clip(np.sum(p * self._fraction_below(z), axis=1), 0.0, 1.0)

    def crps(self, probs, z, chunk: int = 8192) -> np.ndarray:
        """Continuous ranked probability score ∫ (F(x) - 1[x >= z])² dx of each binned p(z).

        Exact: within bin k, F runs linearly from a_k to b_k and is split at the truth, where
        F(z) = c_k. A linear f from u to v over a length L has ∫ f² = L (u² + uv + v²) / 3, so
        bin k contributes δz [t_k (a² + ac + c²) + (1 - t_k)((1-c)² + (1-c)(1-b) + (1-b)²)] / 3
        with t_k the part of the bin below z. A truth outside [0, z_max] adds the distance to
        the range (where |F - 1[x >= z]| = 1). Units of redshift; a one-hot p(z) whose bin is
        centred on the truth scores δz / 12. Rows are processed ``chunk`` at a time.
        """
        p_all = self._probs(probs)
        z_all = self._truth(z, p_all.shape[0])
        out = np.empty(p_all.shape[0])
        for s in range(0, p_all.shape[0], chunk):
            p, z = p_all[s:s + chunk], z_all[s:s + chunk]
            b = np.cumsum(p, axis=1)  # F at the upper edges, (n, n_bins)
            a = b - p  # F at the lower edges
            t = self._fraction_below(z)
            c = a + p * t  # F at the truth, clipped to the bin
            below = t * (a * a + a * c + c * c)
            above = (1 - t) * ((1 - c) ** 2 + (1 - c) * (1 - b) + (1 - b) ** 2)
            outside = np.maximum(-z, 0.0) + np.maximum(z - self.z_max, 0.0)
            out[s:s + chunk] = self.width * np.sum(below + above, axis=1) / 3 + outside
        return out


def pit_histogram(pit, n_bins: int = 20, density: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of PIT values on [0, 1]: ``(counts, edges)``.

    A calibrated p(z) gives a flat histogram, len(pit) / n_bins per bin (or 1 with
    ``density``). Values must lie in [0, 1].
    """
    pit = _finite(pit, "pit").ravel()
    _raise_if((pit < 0) | (pit > 1), pit, "pit", "outside [0, 1]")
    counts, edges = np.histogram(pit, bins=n_bins, range=(0.0, 1.0), density=density)
    return counts, edges


# --------------------------------------------------------------------------- GZ2 binary

def _vote_fraction(p, name: str) -> np.ndarray:
    p = _as_array(p)
    _raise_if(~(np.isfinite(p) & (p >= 0) & (p <= 1)), p, name,
              "outside [0, 1] or not finite (drop galaxies without votes first)")
    return p


def high_quality(p_true, low: float = 0.2, high: float = 0.8, inclusive: bool = False) -> np.ndarray:
    """Mask of "high quality" labels: P < low or P > high (Section 3.2, Figure 3, Appendix C.2).

    The paper prints the strict form three times and "≤ 0.2 ... ≥ 0.8" once (inside η,
    Appendix C.3); strict is the default. Vote fractions sit exactly on 0.2 and 0.8 often
    (1/5, 4/5, 2/10, ...), so ``inclusive=True`` (P <= low or P >= high) gives a visibly
    larger set.
    """
    p = _vote_fraction(p_true, "p_true")
    if not 0 <= low < high <= 1:
        raise ValueError(f"high_quality: need 0 <= low < high <= 1, got low={low}, high={high}")
    return (p <= low) | (p >= high) if inclusive else (p < low) | (p > high)


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def roc_auc(y_true, score) -> float:
    """ROC AUC = ∫ TPR d(FPR), exactly, as the Mann-Whitney U with mid-ranks for ties.

    ``y_true`` is boolean (class 1 = True). NaN when only one class is present.
    """
    y = np.asarray(y_true, dtype=bool).ravel()
    s = _finite(score, "score").ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks: a tie between classes counts 1/2
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(p_true, p_pred, cut: float = 0.5, hq_low: float = 0.2, hq_high: float = 0.8,
                   hq_inclusive: bool = False) -> dict[str, float]:
    """Metrics of a binary GZ2 question on its high-quality labels (Appendix C.3, Figure 3).

    p_true: vote fractions P_true in [0, 1]; p_pred: predicted probabilities P_predict.
    Class 1 is P >= ``cut`` for both (the paper's 0.5 rule). Only labels with
    :func:`high_quality` ``(p_true, hq_low, hq_high, hq_inclusive)`` count.

    accuracy: (TP + TN) / N_HQ.
    precision: TP / (TP + FP). The paper prints TP / (TN + FP), a typo.
    recall: the TPR, TP / (TP + FN).
    fpr: FP / (FP + TN).
    auc: ROC AUC of p_pred against the true class (:func:`roc_auc`).
    eta: η, the fraction (the paper prints percent) of confident mistakes,
        #[(P_true <= hq_low) & (P_pred >= hq_high)] + #[(P_true >= hq_high) & (P_pred <= hq_low)]
        over N_HQ.
    n_hq: N_HQ. n_pos: high-quality labels of class 1.

    A rate whose denominator is zero (no positives, no negatives, no predicted positives,
    no high-quality labels) is NaN; nothing raises for a degenerate split.
    """
    p_t, p_p = _vote_fraction(p_true, "p_true"), _vote_fraction(p_pred, "p_pred")
    _same_shape(p_t, p_p, "p_true and p_pred")
    p_t, p_p = p_t.ravel(), p_p.ravel()
    if not 0 < cut < 1:
        raise ValueError(f"binary_metrics: cut must lie in (0, 1), got {cut}")
    hq = high_quality(p_t, hq_low, hq_high, hq_inclusive)
    p_t, p_p = p_t[hq], p_p[hq]
    y, yhat = p_t >= cut, p_p >= cut
    tp, tn = int(np.sum(y & yhat)), int(np.sum(~y & ~yhat))
    fp, fn = int(np.sum(~y & yhat)), int(np.sum(y & ~yhat))
    confident_wrong = ((p_t <= hq_low) & (p_p >= hq_high)) | ((p_t >= hq_high) & (p_p <= hq_low))
    n = int(hq.sum())
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "fpr": _ratio(fp, fp + tn),
        "auc": roc_auc(y, p_p),
        "eta": _ratio(int(confident_wrong.sum()), n),
        "n_hq": n,
        "n_pos": int(y.sum()),
    }


# --------------------------------------------------------------------------- label efficiency

@dataclass(frozen=True)
class LabelEfficiency:
    """How many times more labels the supervised model needs than the other one.

    factor: n_sup / count_other, where n_sup is the label count at which the supervised
        curve reaches the other model's metric. math.inf when it never does in its measured
        range; below 1 when the supervised model is already better at count_other.
    bound: the factor itself when it is interpolated; max(counts) / count_other when
        ``lower_bound`` (the true factor is at least this); min(counts) / count_other when
        ``upper_bound`` (the supervised model already reaches the metric at its smallest
        measured count, so the true factor is at most this; ``factor`` equals it then).
    """

    factor: float
    bound: float
    lower_bound: bool = False
    upper_bound: bool = False

    def __str__(self) -> str:
        """As a table prints it: "≥ 16" (never reached), "≤ 0.25" (reached at once), or "3.1"."""
        if self.lower_bound:
            return f"≥ {self.bound:.3g}"
        if self.upper_bound:
            return f"≤ {self.bound:.3g}"
        return f"{self.factor:.3g}"


def label_efficiency(counts_supervised, metric_supervised, count_other: float, metric_other: float,
                     higher_is_better: bool) -> LabelEfficiency:
    """Label efficiency of another model against the supervised one (Sections 3.2, 3.3).

    The supervised metric is first replaced by its monotone envelope, the running best over
    increasing label counts (the best it achieved with at most n labels), so noise cannot
    make a curve cross twice. The envelope is linear in log(count) between measured counts;
    n_sup is where it first reaches ``metric_other``. No extrapolation outside the measured
    counts (see :class:`LabelEfficiency`). Repeated runs should be averaged per count first.
    """
    n = _finite(counts_supervised, "counts_supervised").ravel()
    m = _finite(metric_supervised, "metric_supervised").ravel()
    _same_shape(n, m, "counts_supervised and metric_supervised")
    if n.size == 0:
        raise ValueError("label_efficiency: no supervised measurements")
    _raise_if(n <= 0, n, "counts_supervised", "not positive")
    if not (math.isfinite(count_other) and count_other > 0 and math.isfinite(metric_other)):
        raise ValueError(f"label_efficiency: need a positive count_other and finite metric_other, "
                         f"got {count_other}, {metric_other}")
    order = np.argsort(n)
    n, m = n[order], m[order]
    _raise_if(np.diff(n) == 0, n[1:], "counts_supervised", "repeated (average repeats first)")
    sign = 1.0 if higher_is_better else -1.0
    best = np.maximum.accumulate(sign * m)  # envelope, higher is better
    target = sign * metric_other
    reached = np.flatnonzero(best >= target)
    if reached.size == 0:
        return LabelEfficiency(math.inf, float(n[-1] / count_other), lower_bound=True)
    j = int(reached[0])
    if j == 0:
        factor = float(n[0] / count_other)
        return LabelEfficiency(factor, factor, upper_bound=bool(best[0] > target))
    # best[j-1] < target <= best[j]: interpolate in log(count)
    frac = (target - best[j - 1]) / (best[j] - best[j - 1])
    log_n = math.log(n[j - 1]) + frac * (math.log(n[j]) - math.log(n[j - 1]))
    factor = math.exp(log_n) / count_other
    return LabelEfficiency(factor, factor)
