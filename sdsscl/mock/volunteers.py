"""Galaxy Zoo 2 votes from simulated volunteers.

Each volunteer walks the tree of :mod:`sdsscl.gz2`: Q1 (smooth / features or disk / star or
artifact) for everyone, ``edge_on`` only after *features or disk*, ``bar`` only after *not
edge-on*. How likely a volunteer is to see a feature depends on what the image shows: the
feature's strength, the galaxy's size relative to the PSF, its signal-to-noise, its
inclination. Volunteers disagree more than independent coin flips would: each galaxy's
answer probabilities are themselves drawn from a Dirichlet/Beta around the visibility-based
mean (overdispersion), so vote fractions scatter the way GZ2's consensus fractions do.
"""
from __future__ import annotations

import numpy as np

from ..constants import R_BAND
from ..gz2 import BAR, EDGE_ON, SMOOTH
from .population import CONTAMINANTS, MockPhysics


def _logistic(x):
    return 1.0 / (1.0 + np.exp(-x))


def answer_probabilities(p: dict, snr_r: float) -> dict[str, np.ndarray | float]:
    """Mean answer probabilities of a volunteer for one galaxy, from its generating truth.

    Returns ``smooth`` (3,) for (smooth, features_or_disk, star_or_artifact), ``edge_on`` and
    ``bar`` (probability of *yes*).
    """
    fwhm = p["psf_fwhm"][R_BAND]
    size = p["petro_r50"] if p["morphology"] == 0 else p["r_e_disk"]
    resolved = _logistic((np.log(size / fwhm) - np.log(1.1)) / 0.3)  # 0.5 at r_e = 1.1 FWHM
    bright = _logistic((np.log(snr_r) - np.log(40.0)) / 0.5)
    vis = resolved * bright
    kind = CONTAMINANTS[int(p["contaminant"])]
    p_art = 0.004 + {"star": 0.04, "satellite": 0.10, "bad_column": 0.06,
                     "neighbor": 0.01}.get(kind, 0.0)

    if p["morphology"] == 0:
        # smooth spheroids: elongated ones are sometimes taken for disks
        signal = 0.35 * (1 - p["axis_ratio"])
        p_feat = 0.06 + signal
        p_edge = 0.05 + 0.3 * max(0.0, 0.6 - p["axis_ratio"])
        p_bar = 0.05
    else:
        bt = p["bulge_fraction"]
        cos_i = np.cos(np.radians(p["inclination_deg"]))
        face = np.sqrt(cos_i)
        struct = max(p["arm_strength"], 0.9 * p["bar_strength"]) * face
        thin = max(0.0, 1.0 - p["axis_ratio"] / 0.45)  # a thin, elongated disk is obvious
        signal = (1 - bt) ** 0.7 * (0.25 + 0.75 * max(struct, thin))
        p_feat = 0.07 + 0.88 * _logistic((signal * vis - 0.22) / 0.07)
        p_edge = 0.03 + 0.92 * _logistic((0.32 - p["axis_ratio"]) / 0.05)
        p_edge = vis * p_edge + (1 - vis) * 0.25
        bar_len = p["bar_length"] * p["r_e_disk"]
        bar_vis = _logistic((np.log(max(bar_len, 1e-3) / fwhm) - np.log(0.8)) / 0.3) * bright
        p_bar = 0.05 + 0.1 * p["arm_strength"] * face  # arms sometimes read as a bar
        if p["has_bar"]:
            p_bar += 0.9 * p["bar_strength"] * bar_vis * cos_i**0.5
        p_bar = min(p_bar, 0.95)
    q1 = np.array([(1 - p_art) * (1 - p_feat), (1 - p_art) * p_feat, p_art])
    return {"smooth": q1, "edge_on": float(p_edge), "bar": float(p_bar)}


def _beta_binomial(rng, n, mean, kappa):
    if n == 0:
        return 0
    mean = float(np.clip(mean, 1e-4, 1 - 1e-4))
    return int(rng.binomial(n, rng.beta(kappa * mean, kappa * (1 - mean))))


def simulate_votes(p: dict, snr_r: float, rng: np.random.Generator, cfg: MockPhysics) -> dict:
    """Vote counts for the three questions; consistent with the tree by construction.

    Returns ``{"smooth": (3,), "edge_on": (2,), "bar": (2,)}`` int arrays and the mean
    probabilities under ``"p_mean"``.
    """
    n = int(p["n_volunteers"])
    probs = answer_probabilities(p, snr_r)
    kappa = cfg.gz2_overdispersion
    if n == 0:
        zeros = {q.name: np.zeros(len(q.answers), np.int64) for q in (SMOOTH, EDGE_ON, BAR)}
        return {**zeros, "p_mean": probs}
    q1p = rng.dirichlet(kappa * np.clip(probs["smooth"], 1e-3, None))
    q1 = rng.multinomial(n, q1p)
    n_feat = int(q1[SMOOTH.column("features_or_disk")])
    n_edge = _beta_binomial(rng, n_feat, probs["edge_on"], kappa)
    n_face = n_feat - n_edge
    n_bar = _beta_binomial(rng, n_face, probs["bar"], kappa)
    return {
        "smooth": q1.astype(np.int64),
        "edge_on": np.array([n_edge, n_face], np.int64),  # (yes, no)
        "bar": np.array([n_bar, n_face - n_bar], np.int64),  # (yes, no)
        "p_mean": probs,
    }

