"""The mock survey: physics against the real SDSS catalogue, the file, determinism, resume."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from scipy import stats

from sdsscl.constants import (AUTHOR_KEYS, GZ2_R_LIMIT, MAIN_SAMPLE_R_LIMIT, NO_SPECOBJID, R_DR12,
                              R_SF11, nmgy_to_mag)
from sdsscl.gz2 import EDGE_ON, SMOOTH
from sdsscl.mock import MockPhysics, draw_population, generate_mock, load_reference_catalog
from sdsscl.mock import survey as survey_mod
from sdsscl.mock.population import petrosian
from sdsscl.mock.render import render_galaxy
from sdsscl.mock.summary import summarize_mock

N_FILE = 384
SEED = 11


@pytest.fixture(scope="module")
def population():
    """A large population (no images: cheap) for distribution tests."""
    return draw_population(20000, np.random.default_rng(3), MockPhysics())


@pytest.fixture(scope="module")
def reference():
    return load_reference_catalog()


@pytest.fixture(scope="module")
def mock_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mock") / "mock.h5"
    generate_mock(path, n=N_FILE, seed=SEED, workers=2, progress=False)
    return path


# ---------------------------------------------------------------- population vs real SDSS
# Two-sample KS statistic D between 20,000 mock and ~9,800 real galaxies. D measures the
# largest gap between the cumulative distributions; pure sampling noise gives D ~ 0.02.
# We accept D < 0.06: at most 6% of galaxies sit on the "wrong side" of any threshold,
# e.g. a median redshift off by < 0.01 (~10%) or a median r off by < 0.1 mag.
KS_MAX = 0.06


def _colour(flux, a, b):
    m = nmgy_to_mag(flux)
    return m[:, a] - m[:, b]


def test_redshift_distribution_matches_sdss(population, reference):
    d = stats.ks_2samp(population["z"], reference["z"]).statistic
    assert d < KS_MAX, d
    assert abs(np.median(population["z"]) - np.median(reference["z"])) < 0.01


def test_petrosian_r_distribution_and_main_sample_cut(population, reference):
    r = population["petro_mag_dered_r"]
    assert r.max() <= MAIN_SAMPLE_R_LIMIT
    assert stats.ks_2samp(r, reference["petro_mag_dered"][:, 2]).statistic < KS_MAX
    for q in (5, 50, 95):
        assert abs(np.percentile(r, q) - np.percentile(reference["petro_mag_dered"][:, 2], q)) < 0.15


@pytest.mark.parametrize("a,b", [(0, 1), (1, 2), (2, 3), (3, 4)])
def test_colour_distributions_match_sdss(population, reference, a, b):
    ref = reference["model_flux"] * 10 ** (0.4 * reference["extinction"])
    d = stats.ks_2samp(_colour(population["flux"], a, b), _colour(ref, a, b)).statistic
    assert d < KS_MAX, (a, b, d)


def test_mock_is_not_the_catalogue_repeated(population):
    # 20,000 galaxies drawn from ~9,800: redshifts and fluxes must be perturbed, not copied
    assert len(np.unique(population["z"])) > 0.99 * len(population)
    src = population["source_index"]
    dup = np.flatnonzero(np.bincount(src) > 1)[0]
    rows = np.flatnonzero(src == dup)
    assert not np.allclose(population["flux"][rows[0]], population["flux"][rows[1]])


def test_red_spirals_and_blue_ellipticals_exist(population):
    g_r = _colour(population["flux"], 1, 2)
    red = g_r > 0.65 + 2.2 * population["z"]
    disk = population["morphology"] == 1
    assert 0.1 < disk[red].mean() < 0.9  # red disks exist, but red galaxies are mostly smooth-ish
    assert 0.03 < (~disk[~red]).mean() < 0.5  # blue spheroids exist
    assert disk[~red].mean() > disk[red].mean()  # morphology tied to colour


def test_sizes_follow_luminosity(population):
    m = population["abs_mag_r"]
    bright, faint = m < np.percentile(m, 20), m > np.percentile(m, 80)
    assert np.median(population["half_light_kpc"][bright]) > 1.5 * np.median(
        population["half_light_kpc"][faint])


def test_edge_on_disks_and_bars_present(population):
    disk = population["morphology"] == 1
    assert 0.15 < np.mean(population["inclination_deg"][disk] > 75) < 0.35  # isotropic: ~26%
    assert np.all(population["axis_ratio"][disk] >= population["disk_thickness"][disk] - 1e-12)
    assert 0.3 < population["has_bar"][disk].mean() < 0.7
    assert not population["has_bar"][~disk].any()


def test_petrosian_quantities_of_known_profiles():
    # SDSS Petrosian quantities (Blanton et al. 2001; Strauss et al. 2002): an exponential
    # disk has R90/R50 ~ 2.3 and nearly all its light inside 2 R_P; de Vaucouleurs ~3.3 / ~82%
    one = np.ones(1)
    f_exp, r50e, r90e = petrosian([(one, 3 * one, one)])
    f_dev, r50d, r90d = petrosian([(one, 3 * one, 4 * one)])
    assert f_exp[0] > 0.97 and abs(r90e[0] / r50e[0] - 2.3) < 0.1
    assert abs(f_dev[0] - 0.82) < 0.03 and abs(r90d[0] / r50d[0] - 3.3) < 0.2


def test_labels_biased_like_the_paper(population):
    has = population["has_specz"]
    assert 0.33 < has.mean() < 0.43  # paper: 517k of 1.36M = 0.38
    assert np.median(population["ebv"][has]) < np.median(population["ebv"][~has])
    gz = population["in_gz2"]
    assert np.all(has[gz]) and np.all(population["petro_mag_dered_r"][gz] < GZ2_R_LIMIT)
    nv = population["n_volunteers"][gz]
    assert np.all(nv >= 28) and 38 <= np.median(nv) <= 50  # GZ2: median 44, >99.9% >= 28


def test_config_rejects_unknown_and_impossible_values():
    with pytest.raises(ValueError, match="unknown MockPhysics keys"):
        MockPhysics.from_dict({"z_scater": 0.1})
    with pytest.raises(ValueError, match="sky_sigma"):
        MockPhysics(sky_sigma=(0.1, 0.1))
    with pytest.raises(ValueError, match="z_scatter"):
        MockPhysics(z_scatter=-1.0)
    with pytest.raises(ValueError, match="contaminant_rates"):
        MockPhysics(contaminant_rates=(0.5, 0.5, 0.1, 0.1))


# ---------------------------------------------------------------- images
def test_reddening_recorded_equals_dimming_applied():
    cfg = MockPhysics()
    pop = draw_population(8, np.random.default_rng(5), cfg)
    row = pop.row(0)
    clear = dict(row, dimming_mag=np.zeros(5), contaminant=0)
    dusty = dict(row, contaminant=0)
    m0 = render_galaxy(clear, np.random.default_rng(1), cfg)["model"].astype(np.float64)
    m1 = render_galaxy(dusty, np.random.default_rng(1), cfg)["model"].astype(np.float64)
    ebv_recorded = np.mean(row["e_bv"] / R_DR12)  # the paper's recipe on the recorded column
    expected = 10 ** (-0.4 * R_SF11 * ebv_recorded)
    ratio = m1.sum(axis=(1, 2)) / m0.sum(axis=(1, 2))
    np.testing.assert_allclose(ratio, expected, rtol=1e-5)
    np.testing.assert_allclose(row["e_bv"], row["ebv"] * R_DR12)  # DR12 per-band convention


def test_file_fluxes_and_extinction_consistent(mock_file):
    with h5py.File(mock_file) as f:
        e_bv = f["e_bv"][:]
        flux = f["truth/model_flux"][:]
        dered = f["truth/flux_dered"][:]
    ebv = np.mean(e_bv / R_DR12, axis=1)
    np.testing.assert_allclose(flux / dered, 10 ** (-0.4 * R_SF11[None] * ebv[:, None]), rtol=1e-5)


def test_catalogue_photometry_is_measured_with_its_catalogued_errors(mock_file):
    # catalog/model_flux = true flux + N(0, ivar**-0.5); petro_mag has the same relative error
    with h5py.File(mock_file) as f:
        measured = f["catalog/model_flux"][:].astype(np.float64)
        true = f["truth/model_flux"][:].astype(np.float64)
        ivar = f["catalog/model_flux_ivar"][:].astype(np.float64)
        snr = f["catalog/model_snr"][:].astype(np.float64)
        petro, petro_true = f["catalog/petro_mag"][:], f["truth/petro_mag"][:]
    pull = (measured - true) * np.sqrt(ivar)                          # (N, 5), should be N(0, 1)
    assert pull.shape == (N_FILE, 5) and np.all(np.isfinite(pull))
    assert np.all(np.abs(pull.mean(axis=0)) < 4 / np.sqrt(N_FILE))    # 4 sigma of the mean
    np.testing.assert_allclose(pull.std(axis=0), 1.0, atol=0.12)      # ~3 sigma of the std at N = 384
    assert stats.kstest(pull.ravel(), "norm").pvalue > 1e-3
    assert not np.allclose(measured, true)
    rel = (measured - true) / true                                    # = noise / S/N per band
    np.testing.assert_allclose(np.abs(rel) * snr, np.abs(pull), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose((petro_true - petro) * np.log(10) / 2.5, rel, rtol=1e-3, atol=1e-5)


def test_image_flux_matches_catalogue_flux(mock_file):
    with h5py.File(mock_file) as f:
        clean = (f["truth/contaminant"][:] == 0) & (f["catalog/petro_r90"][:] < 8.0)
        idx = np.flatnonzero(clean)[:60]
        imgs = f["images"][np.sort(idx)].astype(np.float64)
        flux = f["truth/model_flux"][np.sort(idx)]                     # without measurement noise
        sky = f["truth/sky_sigma"][np.sort(idx)]
    total = imgs.sum(axis=(2, 3))
    noise = sky * imgs.shape[-1]  # std of a sum of 107^2 sky pixels
    # faint background sources add a little light, flux beyond the cutout is lost
    err = np.abs(total - flux) - 5 * noise
    assert np.mean(err < 0.05 * flux) > 0.9, np.median(total / flux, axis=0)
    np.testing.assert_allclose(np.median(total / flux, axis=0)[1:4], 1.0, atol=0.03)


def test_measured_noise_matches_configured(mock_file):
    with h5py.File(mock_file) as f:
        small = (f["catalog/petro_r90"][:] < 6) & (f["truth/contaminant"][:] == 0)
        idx = np.sort(np.flatnonzero(small)[:80])
        imgs = f["images"][idx].astype(np.float64)
        sky = f["truth/sky_sigma"][idx]
    corners = np.concatenate([imgs[:, :, :20, :20], imgs[:, :, :20, -20:],
                              imgs[:, :, -20:, :20], imgs[:, :, -20:, -20:]], axis=2)
    flat = corners.reshape(len(idx), 5, -1)
    med = np.median(flat, axis=2, keepdims=True)
    measured = 1.4826 * np.median(np.abs(flat - med), axis=2)
    ratio = np.median(measured / sky, axis=0)
    np.testing.assert_allclose(ratio, 1.0, atol=0.05)
    # u and z far noisier than g, r, i (DATA-FACTS)
    assert np.median(sky[:, 4]) > 3 * np.median(sky[:, 1:4])


def test_snr_close_to_real_catalogue(mock_file, reference):
    with h5py.File(mock_file) as f:
        snr = f["catalog/model_snr"][:]
    real = np.median(reference["model_snr"], axis=0)
    # matched-filter S/N of the mock vs the catalogue's model-flux S/N: within 25% per band
    np.testing.assert_allclose(np.median(snr, axis=0), real, rtol=0.25)
    assert np.median(snr[:, 0]) < 0.2 * np.median(snr[:, 2])  # u far noisier than r


# ---------------------------------------------------------------- the file
def test_file_has_author_layout(mock_file):
    with h5py.File(mock_file) as f:
        for key, shape in AUTHOR_KEYS.items():
            assert f[key].shape == (N_FILE,) + shape, key
        assert f["images"].dtype == np.float32
        assert f.attrs["format"] == survey_mod.FORMAT and f.attrs["seed"] == SEED
        assert json.loads(f.attrs["config"])["n"] == N_FILE
        assert "_progress" not in f
        assert len(np.unique(f["ObjID"][:])) == N_FILE
        has = np.isfinite(f["specz_redshift"][:])
        assert np.all(f["specObjID"][:][~has] == NO_SPECOBJID)
        assert np.all(np.isnan(f["specz_redshift_err"][:][~has]))
        assert np.all(f["specObjID"][:][has] > 0)
        z_true = f["truth/redshift"][:]
        np.testing.assert_allclose(f["specz_redshift"][:][has], z_true[has], atol=1e-3)
        assert np.all(np.isfinite(f["images"][:16]))


def test_votes_consistent_with_tree(mock_file):
    with h5py.File(mock_file) as f:
        n = f["gz2/n_volunteers"][:].astype(int)
        q1 = f["gz2/smooth/votes"][:].astype(int)
        q2 = f["gz2/edge_on/votes"][:].astype(int)
        q3 = f["gz2/bar/votes"][:].astype(int)
        frac = f["gz2/smooth/fraction"][:]
        has = np.isfinite(f["specz_redshift"][:])
    assert np.array_equal(q1.sum(1), n)
    assert np.array_equal(q2.sum(1), q1[:, SMOOTH.column("features_or_disk")])
    assert np.array_equal(q3.sum(1), q2[:, EDGE_ON.column("no")])
    assert np.all(n[~has] == 0) and (n > 0).sum() > 20
    assert np.all(np.isnan(frac[n == 0]))
    np.testing.assert_allclose(frac[n > 0].sum(1), 1.0, rtol=1e-6)


def test_volunteers_see_what_is_visible(mock_file):
    with h5py.File(mock_file) as f:
        n = f["gz2/n_volunteers"][:]
        morph = f["truth/morphology"][:]
        q1 = f["gz2/smooth/votes"][:]
        edge = f["truth/is_edge_on"][:]
        q2 = f["gz2/edge_on/votes"][:]
    gz = n > 0
    p_smooth = SMOOTH.binary_fraction(q1)
    assert np.mean(p_smooth[gz & (morph == 0)]) > np.mean(p_smooth[gz & (morph == 1)]) + 0.2
    p_edge = EDGE_ON.binary_fraction(q2)
    ok = gz & (EDGE_ON.binary_count(q2) >= 5) & (morph == 1)
    assert (ok & edge).sum() >= 3  # the fixture holds edge-on disks with edge-on votes
    assert np.nanmean(p_edge[ok & edge]) > np.nanmean(p_edge[ok & ~edge]) + 0.2
    # overdispersion: vote fractions are not all near 0 or 1
    mid = (p_smooth[gz] > 0.2) & (p_smooth[gz] < 0.8)
    assert 0.1 < mid.mean() < 0.6


def test_same_seed_bit_identical_whatever_the_workers(tmp_path):
    a = generate_mock(tmp_path / "a.h5", n=96, seed=4, workers=1, progress=False, chunk=32)
    b = generate_mock(tmp_path / "b.h5", n=96, seed=4, workers=2, progress=False, chunk=32)
    assert survey_mod.file_sha256(a) == survey_mod.file_sha256(b)
    c = generate_mock(tmp_path / "c.h5", n=96, seed=5, workers=1, progress=False, chunk=32)
    with h5py.File(a) as fa, h5py.File(c) as fc:
        assert not np.array_equal(fa["images"][:4], fc["images"][:4])


def test_interrupted_run_leaves_no_complete_file_and_resumes(tmp_path, monkeypatch):
    ref = generate_mock(tmp_path / "ref.h5", n=80, seed=9, workers=1, progress=False, chunk=16)
    out = tmp_path / "run.h5"
    real_write = survey_mod._write_chunk
    calls = {"n": 0}

    def dying(f, start, res):
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        real_write(f, start, res)

    monkeypatch.setattr(survey_mod, "_write_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        generate_mock(out, n=80, seed=9, workers=1, progress=False, chunk=16)
    assert not out.exists()
    partial = out.with_name(out.name + ".partial")
    assert partial.exists()
    with h5py.File(partial) as f:
        assert f["_progress/done"][:].sum() == 2 and "complete" not in f.attrs
    monkeypatch.setattr(survey_mod, "_write_chunk", real_write)
    generate_mock(out, n=80, seed=9, workers=2, progress=False, chunk=16)
    assert out.exists() and not partial.exists()
    with h5py.File(out) as f, h5py.File(ref) as g:
        for key in ("images", "ra", "specz_redshift", "gz2/smooth/votes", "catalog/model_snr"):
            np.testing.assert_array_equal(f[key][:], g[key][:], err_msg=key)


def test_existing_file_with_other_settings_is_not_overwritten(tmp_path):
    p = generate_mock(tmp_path / "x.h5", n=16, seed=1, workers=1, progress=False)
    generate_mock(p, n=16, seed=1, workers=1, progress=False)  # same settings: kept
    with pytest.raises(FileExistsError, match="x.h5"):
        generate_mock(p, n=16, seed=2, workers=1, progress=False)


def test_summary_puts_mock_beside_sdss(mock_file):
    s = summarize_mock(mock_file)
    assert set(s) >= {"mock", "sdss", "ks", "gz2", "labels"}
    assert s["sdss"]["n"] > 9000
    assert abs(s["mock"]["z_median"] - s["sdss"]["z_median"]) < 0.02
    assert 0 < s["labels"]["labelled_fraction"] < 1
