"""Tests of sdsscl.metrics: hand-computed cases, scikit-learn, and brute-force integrals.

Everything runs on small arrays with fixed seeds; tolerances are stated where they are used.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score

from sdsscl.constants import PHOTOZ_NBINS, PHOTOZ_ZMAX
from sdsscl.metrics import (
    LabelEfficiency,
    RedshiftBins,
    binary_metrics,
    delta_z,
    high_quality,
    label_efficiency,
    photoz_metrics,
    pit_histogram,
    roc_auc,
)

# ----------------------------------------------------------------------------- photo-z


def test_delta_z_by_hand():
    dz = delta_z([0.11, 0.2], [0.1, 0.25])
    np.testing.assert_allclose(dz, [0.01 / 1.1, -0.04], rtol=1e-12)


def test_photoz_metrics_by_hand():
    # z_s = 0, so Δz = z_p. median(Δz) = 0.01; |Δz - 0.01| = [0, .03, .02, .05, .11, .04] -> MAD 0.035
    z_p = np.array([0.01, -0.02, 0.03, 0.06, -0.1, 0.05])
    m = photoz_metrics(z_p, np.zeros(6))
    assert m["bias"] == pytest.approx(0.03 / 6, abs=1e-15)
    assert m["sigma_mad"] == pytest.approx(1.4826 * 0.035, rel=1e-12)
    assert m["eta"] == pytest.approx(2 / 6)  # 0.06 and -0.1; |Δz| = 0.05 exactly is not an outlier
    assert m["n"] == 6


def test_photoz_metrics_scale_with_one_plus_z():
    z_s = np.array([0.1, 0.3])
    m = photoz_metrics(z_s + 0.06 * (1 + z_s), z_s)  # Δz = 0.06 for both
    assert m["bias"] == pytest.approx(0.06) and m["eta"] == 1.0 and m["sigma_mad"] == pytest.approx(0, abs=1e-15)


def test_sigma_mad_of_gaussian_residuals():
    # The MAD estimate of sigma has relative standard error ~1.17 / sqrt(N) = 0.26% at N = 2e5;
    # 2% is > 7 standard errors.
    rng = np.random.default_rng(0)
    z_s = rng.uniform(0.0, 0.4, 200_000)
    dz = rng.normal(0.0, 0.02, z_s.size)
    m = photoz_metrics(z_s + dz * (1 + z_s), z_s)
    assert m["sigma_mad"] == pytest.approx(0.02, rel=0.02)
    assert abs(m["bias"]) < 5 * 0.02 / math.sqrt(z_s.size)
    assert m["eta"] == pytest.approx(2 * stats.norm.sf(2.5), abs=0.002)


def test_photoz_metrics_accepts_torch():
    m = photoz_metrics(torch.tensor([0.1, 0.2]), torch.tensor([0.1, 0.2]))
    assert m["bias"] == 0.0 and m["n"] == 2


@pytest.mark.parametrize("z_phot, z_spec, match", [
    ([0.1, 0.2], [0.1], "same shape"),
    ([0.1, np.nan], [0.1, 0.2], r"z_phot: 1 of 2 values are not finite \(first at flat index 1"),
    ([0.1, 0.2], [np.inf, 0.2], "z_spec: 1 of 2 values are not finite"),
    ([0.1], [-1.0], "<= -1"),
    ([], [], "empty"),
])
def test_photoz_metrics_rejects_bad_input(z_phot, z_spec, match):
    with pytest.raises(ValueError, match=match):
        photoz_metrics(z_phot, z_spec)


# ----------------------------------------------------------------------------- redshift bins

BINS = RedshiftBins()
SMALL = RedshiftBins(n_bins=4, z_max=1.0)  # width 0.25


def test_paper_binning():
    assert (BINS.n_bins, BINS.z_max) == (PHOTOZ_NBINS, PHOTOZ_ZMAX) == (180, 0.4)
    assert BINS.width == pytest.approx(2.222e-3, rel=1e-3)
    assert BINS.edges.shape == (181,) and BINS.edges[0] == 0.0 and BINS.edges[-1] == 0.4
    np.testing.assert_allclose(np.diff(BINS.edges), BINS.width, rtol=1e-9)
    np.testing.assert_allclose(BINS.centers, BINS.edges[:-1] + BINS.width / 2, rtol=1e-12)


@pytest.mark.parametrize("n_bins, z_max", [(0, 0.4), (2.5, 0.4), (10, 0.0), (10, math.inf)])
def test_bins_reject_bad_settings(n_bins, z_max):
    with pytest.raises(ValueError, match="RedshiftBins"):
        RedshiftBins(n_bins, z_max)


def test_encode_edges_and_clipping():
    idx, n_clipped = SMALL.encode([0.0, 0.1, 0.25, 0.74, 1.0, 1.3, 5.0], return_clipped=True)
    np.testing.assert_array_equal(idx, [0, 0, 1, 2, 3, 3, 3])
    assert idx.dtype == np.int64
    assert n_clipped == 2  # 1.0 = z_max is in range; 1.3 and 5.0 are clipped
    # every lower edge maps to its own bin despite floating point
    np.testing.assert_array_equal(BINS.encode(BINS.edges[:-1]), np.arange(180))
    np.testing.assert_array_equal(BINS.encode(BINS.centers), np.arange(180))
    assert BINS.encode([0.1], return_clipped=True)[1] == 0


def test_encode_rejects_negative_and_nan():
    with pytest.raises(ValueError, match=r"z: 1 of 3 values are negative .* -0\.001"):
        BINS.encode([0.1, -0.001, 0.2])
    with pytest.raises(ValueError, match="not finite"):
        BINS.encode([0.1, np.nan])


def test_expected_of_one_hot_is_the_bin_centre_exactly():
    assert np.array_equal(BINS.expected(np.eye(180)), BINS.centers)
    assert np.array_equal(BINS.expected(torch.eye(180, dtype=torch.float32)), BINS.centers)


def test_expected_by_hand():
    p = np.array([[0.5, 0.5, 0, 0], [0.1, 0.2, 0.3, 0.4]])
    c = np.array([0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(SMALL.expected(p), [0.25, c @ p[1]], rtol=1e-12)


def test_probs_are_renormalised_within_tolerance():
    p = np.array([[0.5, 0.5, 0, 0]]) * (1 + 5e-5)
    np.testing.assert_allclose(SMALL.expected(p), [0.25], rtol=1e-14)


@pytest.mark.parametrize("probs, match", [
    (np.full((2, 4), 0.3), "row sums: 2 of 2 values are further than 0.0001 from 1"),
    (np.array([[1.2, -0.2, 0, 0]]), "probs: 1 of 4 values are negative"),
    (np.full((2, 3), 1 / 3), r"shape \(N, 4\)"),
    (np.full(4, 0.25), r"shape \(N, 4\)"),
    (np.array([[np.nan, 1, 0, 0]]), "not finite"),
])
def test_bad_probs_raise(probs, match):
    with pytest.raises(ValueError, match=match):
        SMALL.expected(probs)


def test_cdf_by_hand():
    p = np.tile([0.1, 0.2, 0.3, 0.4], (4, 1))
    np.testing.assert_allclose(SMALL.cdf(p, [0.375, -0.1, 2.0, 1.0]), [0.1 + 0.2 * 0.5, 0.0, 1.0, 1.0], rtol=1e-12)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        SMALL.cdf(p, [0.1, 0.2])


def test_pit_of_one_bin_density_is_linear_inside_the_bin():
    # p(z) uniform in bin k: F rises linearly from 0 to 1 across it, so a truth uniform in
    # the bin has a uniform PIT, and truths outside the bin have PIT 0 or 1.
    k = 77
    rng = np.random.default_rng(1)
    frac = rng.uniform(size=500)
    z = BINS.edges[k] + frac * BINS.width
    one_hot = np.zeros((z.size, 180))
    one_hot[:, k] = 1
    pit = BINS.cdf(one_hot, z)
    np.testing.assert_allclose(pit, frac, atol=1e-9)
    assert stats.kstest(pit, "uniform").pvalue > 0.01
    np.testing.assert_array_equal(BINS.cdf(one_hot[:2], [BINS.edges[k] - 1e-4, BINS.edges[k + 1] + 1e-4]), [0, 1])


def _random_pz(rng, n, n_bins, concentration=0.3):
    return rng.dirichlet(np.full(n_bins, concentration), size=n)


def test_pit_of_samples_from_the_predicted_pz_is_uniform():
    rng = np.random.default_rng(2)
    p = _random_pz(rng, 3000, 180)
    # draw z from each piecewise-constant p(z): a bin by its probability, then uniform within it
    k = np.minimum((np.cumsum(p, axis=1) < rng.uniform(size=(3000, 1))).sum(axis=1), 179)
    z = BINS.edges[k] + rng.uniform(size=3000) * BINS.width
    pit = BINS.cdf(p, z)
    assert stats.kstest(pit, "uniform").pvalue > 0.01
    counts, edges = pit_histogram(pit, n_bins=10)
    assert counts.sum() == 3000 and edges[0] == 0 and edges[-1] == 1
    assert stats.chisquare(counts).pvalue > 0.01


def test_pit_histogram_checks_range():
    counts, _ = pit_histogram(np.linspace(0, 1, 101)[:-1], n_bins=4, density=True)
    np.testing.assert_allclose(counts, 1.0)
    with pytest.raises(ValueError, match=r"pit: 1 of 2 values are outside \[0, 1\]"):
        pit_histogram([0.5, 1.5])


def test_crps_of_one_hot_centred_on_truth_is_width_over_twelve():
    # Uniform density of width w around the truth: F rises linearly from 0 to 1, so
    # CRPS = ∫_{-w/2}^{0} (1/2 + x/w)² dx + ∫_{0}^{w/2} (1/2 - x/w)² dx = 2 · w/24 = w/12.
    np.testing.assert_allclose(BINS.crps(np.eye(180), BINS.centers), BINS.width / 12, rtol=1e-10)


@pytest.mark.parametrize("y, expected", [
    (0.3, 0.3**2 - 0.3 + 1 / 3),  # uniform on [0, 1]: CRPS = y² - y + 1/3 inside
    (0.0, 1 / 3),
    (-0.5, 0.5 + 1 / 3),  # outside the range: add the distance to it
    (1.4, 0.4 + 1 / 3),
])
def test_crps_of_uniform_density_by_hand(y, expected):
    assert SMALL.crps(np.full((1, 4), 0.25), [y])[0] == pytest.approx(expected, rel=1e-12)


def _crps_brute_force(p, z, bins, n_grid=200_001):
    """∫ (F(x) - 1[x >= z])² dx by the trapezoid rule on fine grids either side of z."""
    cdf_at_edges = np.concatenate([[0.0], np.cumsum(p)])
    lo, hi = min(z, 0.0) - 0.05, max(z, bins.z_max) + 0.05  # F is 0 / 1 beyond the range
    below, above = np.linspace(lo, z, n_grid), np.linspace(z, hi, n_grid)
    f_below = np.interp(below, bins.edges, cdf_at_edges, left=0.0, right=1.0)
    f_above = np.interp(above, bins.edges, cdf_at_edges, left=0.0, right=1.0)
    return np.trapezoid(f_below**2, below) + np.trapezoid((1 - f_above) ** 2, above)


def test_crps_matches_brute_force_integration():
    # The integrand is piecewise quadratic; trapezoid error at 2e5 points is < 1e-9 here.
    rng = np.random.default_rng(3)
    p = _random_pz(rng, 12, 180)
    z = rng.uniform(-0.05, 0.45, 12)
    z[:3] = [BINS.edges[40], 0.4, 0.0]  # a truth on an edge and at both ends of the range
    exact = BINS.crps(p, z)
    brute = np.array([_crps_brute_force(p[i], z[i], BINS) for i in range(12)])
    np.testing.assert_allclose(exact, brute, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(BINS.crps(p, z, chunk=5), exact, rtol=1e-14)  # chunking changes nothing


# ----------------------------------------------------------------------------- GZ2 binary


def test_high_quality_boundaries():
    p = [0.0, 0.2, 0.5, 0.8, 1.0, 0.19, 0.81]
    np.testing.assert_array_equal(high_quality(p), [1, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(high_quality(p, inclusive=True), [1, 1, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="low < high"):
        high_quality(p, low=0.8, high=0.2)


def test_binary_metrics_by_hand():
    # HQ: all but index 4. True class y = [1, 1, 0, 0, 1, 0]; predicted [1, 0, 1, 0, 1, 0]:
    # TP = 2 (0, 5), FN = 1 (1), FP = 1 (2), TN = 2 (3, 6).
    p_true = [0.9, 0.95, 0.1, 0.05, 0.5, 0.85, 0.15]
    p_pred = [0.7, 0.1, 0.6, 0.2, 0.9, 0.9, 0.3]
    m = binary_metrics(p_true, p_pred)
    assert m["n_hq"] == 6 and m["n_pos"] == 3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["fpr"] == pytest.approx(1 / 3)
    # positive scores 0.7, 0.1, 0.9 beat 3, 0, 3 of the negatives 0.6, 0.2, 0.3
    assert m["auc"] == pytest.approx(6 / 9)
    assert m["eta"] == pytest.approx(1 / 6)  # only index 1: P_true 0.95, P_pred 0.1


def test_eta_counts_predictions_on_the_boundary():
    m = binary_metrics([0.1, 0.9, 0.1, 0.9], [0.8, 0.2, 0.79, 0.21])
    assert m["eta"] == pytest.approx(2 / 4)


def test_class_one_starts_at_the_cut():
    m = binary_metrics([0.9, 0.1], [0.5, 0.4999])
    assert m["accuracy"] == 1.0 and m["precision"] == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    p_true = rng.uniform(size=4000)
    p_pred = np.clip(np.round(p_true + rng.normal(0, 0.3, p_true.size), 2), 0, 1)  # rounding makes ties
    m = binary_metrics(p_true, p_pred)
    hq = (p_true < 0.2) | (p_true > 0.8)
    y, score = p_true[hq] >= 0.5, p_pred[hq]
    assert m["n_hq"] == hq.sum() and m["n_pos"] == y.sum()
    assert m["accuracy"] == pytest.approx(accuracy_score(y, score >= 0.5), abs=1e-12)
    assert m["precision"] == pytest.approx(precision_score(y, score >= 0.5), abs=1e-12)
    assert m["recall"] == pytest.approx(recall_score(y, score >= 0.5), abs=1e-12)
    assert m["fpr"] == pytest.approx(1 - recall_score(~y, score < 0.5), abs=1e-12)
    assert m["auc"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_roc_auc_ties_count_half():
    assert roc_auc([1, 0, 1, 0], [0.3, 0.3, 0.3, 0.3]) == 0.5
    assert roc_auc([1, 0], [0.9, 0.1]) == 1.0


def test_degenerate_splits_give_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        only_negatives = binary_metrics([0.1, 0.05], [0.1, 0.3])
        no_hq = binary_metrics([0.5, 0.6], [0.1, 0.9])
    assert only_negatives["accuracy"] == 1.0 and only_negatives["fpr"] == 0.0
    assert math.isnan(only_negatives["recall"]) and math.isnan(only_negatives["auc"])
    assert math.isnan(only_negatives["precision"])  # no predicted positives
    assert no_hq["n_hq"] == 0
    assert all(math.isnan(no_hq[k]) for k in ("accuracy", "precision", "recall", "fpr", "auc", "eta"))


@pytest.mark.parametrize("p_true, p_pred, match", [
    ([0.1, 1.2, 0.9, -0.1], [0.5] * 4, r"p_true: 2 of 4 values are outside \[0, 1\] or not finite .*index 1: 1\.2"),
    ([0.1, np.nan], [0.5, 0.5], "p_true: 1 of 2 values"),
    ([0.1, 0.9], [0.5, np.inf], "p_pred: 1 of 2 values"),
    ([0.1, 0.9], [0.5], "same shape"),
])
def test_binary_metrics_reject_bad_labels(p_true, p_pred, match):
    with pytest.raises(ValueError, match=match):
        binary_metrics(p_true, p_pred)


# ----------------------------------------------------------------------------- label efficiency

COUNTS = 2.0 ** np.arange(4, 15)  # 16 ... 16384 labels


def test_label_efficiency_on_log_curve():
    # metric = log2(count): the other model at n = 256 scores log2(4 n), which the supervised
    # model reaches at exactly 4 n.
    eff = label_efficiency(COUNTS, np.log2(COUNTS), 256, np.log2(4 * 256), higher_is_better=True)
    assert eff == LabelEfficiency(pytest.approx(4.0, rel=1e-12), pytest.approx(4.0, rel=1e-12))
    # between measured counts the interpolation is linear in log(count), so 3 n is exact too
    assert label_efficiency(COUNTS, np.log2(COUNTS), 256, np.log2(3 * 256), True).factor == pytest.approx(3.0)


def test_label_efficiency_lower_is_better():
    sigma = 0.05 - 0.002 * np.log2(COUNTS)  # σ_MAD falling with labels
    eff = label_efficiency(COUNTS, sigma, 1000, 0.05 - 0.002 * np.log2(2500), higher_is_better=False)
    assert eff.factor == pytest.approx(2.5) and not (eff.lower_bound or eff.upper_bound)


def test_label_efficiency_below_one_when_supervised_is_better():
    assert label_efficiency(COUNTS, np.log2(COUNTS), 256, np.log2(128), True).factor == pytest.approx(0.5)


def test_label_efficiency_never_reached_is_a_lower_bound():
    eff = label_efficiency(COUNTS, np.log2(COUNTS), 256, 20.0, True)
    assert eff.factor == math.inf and eff.lower_bound and eff.bound == 16384 / 256


def test_label_efficiency_reached_at_smallest_count_is_an_upper_bound():
    eff = label_efficiency(COUNTS, np.log2(COUNTS), 256, 3.0, True)
    assert eff.upper_bound and eff.factor == eff.bound == 16 / 256
    assert not label_efficiency(COUNTS, np.log2(COUNTS), 256, 4.0, True).upper_bound  # reached exactly


def test_label_efficiency_uses_running_best_envelope():
    counts, metric = [8, 1, 4, 2], [3.0, 0.0, 1.0, 2.0]  # unsorted; dips at 4 labels
    # envelope over 1, 2, 4, 8 labels: 0, 2, 2, 3
    assert label_efficiency(counts, metric, 1, 1.5, True).factor == pytest.approx(2**0.75)
    assert label_efficiency(counts, metric, 1, 2.5, True).factor == pytest.approx(4 * 2**0.5)


@pytest.mark.parametrize("counts, metric, match", [
    ([1, 2, 2], [0, 1, 2], "repeated"),
    ([0, 2], [0, 1], "not positive"),
    ([1, 2], [0, np.nan], "not finite"),
    ([1, 2], [0], "same shape"),
])
def test_label_efficiency_rejects_bad_curves(counts, metric, match):
    with pytest.raises(ValueError, match=match):
        label_efficiency(counts, metric, 1, 0.5, True)


def test_label_efficiency_prints_bounds_as_a_table_shows_them():
    from sdsscl.metrics import LabelEfficiency

    assert str(LabelEfficiency(math.inf, 16.0, lower_bound=True)) == "≥ 16"
    assert str(LabelEfficiency(0.25, 0.25, upper_bound=True)) == "≤ 0.25"
    assert str(LabelEfficiency(3.14159, 3.14159)) == "3.14"
