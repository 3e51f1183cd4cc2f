"""Profiles: typed, complete, checked on entry; overrides pass the same checks; the hash is stable."""
from __future__ import annotations

import json
import textwrap

import pytest

from sdsscl.config import (AUGMENTATIONS, PROFILE_NAMES, ConfigError, Profile, apply_overrides, load_profile,
                           parse_override, project_root)
from sdsscl.provenance import Provenance, Table, mock_fingerprint, read_metrics, run_paths, write_metrics


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_shipped_profiles_load(name):
    profile = load_profile(name)
    assert isinstance(profile, Profile)
    assert profile.name == name
    assert profile.overrides == {}
    assert len(profile.config_hash()) == 12


def test_default_is_the_embedded_default():
    p = load_profile("default")
    assert (p.mock.n_galaxies, p.mock.seed) == (20_000, 2021)
    assert (p.data.split.train, p.data.split.val, p.data.split.test) == (0.7, 0.1, 0.2)
    assert p.data.source == "mock"


def test_smoke_is_tiny_and_extends_default():
    smoke, default = load_profile("smoke"), load_profile("default")
    assert smoke.mock.n_galaxies <= 1000
    assert smoke.augment == default.augment  # inherited, not restated
    assert smoke.config_hash() != default.config_hash()


def test_paper_profile_carries_section_2_and_appendix_values():
    p = load_profile("paper")
    a = p.augment
    assert (a.max_ebv, a.psf_sigma_r_arcsec, a.psf_wavelength_power) == (0.5, 0.13, -0.3)
    assert (a.max_jitter, a.crop_size, a.noise_scale_min, a.noise_scale_max) == (7, 64, 1.0, 3.0)
    assert set(a.enabled) == set(AUGMENTATIONS) - {"psf"}  # Appendix D: all but PSF
    assert p.mock is None and p.data.source == "files"
    assert p.data.unlabelled == "train*.h5" and p.data.labelled == "sdss_w_specz_valid.h5"
    assert p.data.mad_subsample is None  # "pre-computed over all training examples"
    assert p.data.gz2_min_votes == 5


def test_paper_yaml_cites_a_section_for_every_augmentation_value():
    text = (project_root() / "profiles" / "paper.yaml").read_text()
    block = text.split("augment:")[1].split("pretrain:")[0]
    for line in block.strip().splitlines():
        assert "Section" in line or line.strip().startswith(("noise_scale_max", "#")), line


def test_paper_yaml_gives_a_source_for_every_pretraining_value():
    text = (project_root() / "profiles" / "paper.yaml").read_text()
    block = text.split("\npretrain:")[1].split("\nrepresentations:")[0]
    speed_only = ("checkpoint_every", "log_every", "num_workers", "encoder:")
    for line in block.strip().splitlines():
        if line.strip().startswith(speed_only):
            continue
        assert any(src in line for src in ("Appendix", "Section", "MoCo", "He et al", "not given")), line
    p = load_profile("paper").pretrain
    assert (p.encoder.arch, p.encoder.stem_stride, p.encoder.width) == ("resnet50", 1, 64)
    assert (p.base_lr, p.key_momentum, p.temperature, p.epochs) == (0.03, 0.999, 0.1, 50)
    assert p.queue_size % (p.batch_size * 8) == 0  # 8 GPUs, as the paper ran


def test_overrides_apply_and_validate():
    p = load_profile("smoke", {"mock.n_galaxies": 500, "seed": 7})
    assert p.mock.n_galaxies == 500 and p.seed == 7
    assert p.overrides == {"mock.n_galaxies": 500, "seed": 7}
    assert p.run_name == f"smoke-{p.config_hash()}"
    with pytest.raises(ConfigError, match="unknown key"):
        load_profile("smoke", {"mock.n_galaxy": 500})
    with pytest.raises(ConfigError, match="at least 10"):
        load_profile("smoke", {"mock.n_galaxies": 0})
    with pytest.raises(ConfigError, match="expected an integer"):
        load_profile("smoke", {"mock.seed": "seven"})
    with pytest.raises(ConfigError, match="not a section"):
        load_profile("smoke", {"seed.value": 1})


@pytest.mark.parametrize("overrides, message", [
    ({"data.split.test": 0.5}, "sum to 1"),
    ({"augment.crop_size": 100}, "exceeds"),
    ({"augment.enabled": ["rotation"]}, "unknown augmentations"),
    ({"augment.noise_scale_min": 4.0}, "noise_scale_min"),
    ({"augment.max_ebv": -0.1}, "non-negative"),
    ({"data.source": "files"}, "data.root"),
    ({"data.source": "hdf5"}, "one of"),
    ({"mock": None}, "mock section"),
    ({"book.gallery_redshift_bins": [0.1, 0.0]}, "increasing"),
    ({"mock.workers": True}, "integer"),
])
def test_impossible_values_raise(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("default", overrides)


def write_profile(tmp_path, name, text):
    (tmp_path / "profiles").mkdir(exist_ok=True)
    (tmp_path / "profiles" / f"{name}.yaml").write_text(textwrap.dedent(text))


def test_unknown_and_missing_keys_in_a_file_raise(tmp_path):
    base = (project_root() / "profiles" / "default.yaml").read_text()
    write_profile(tmp_path, "typo", base.replace("max_jitter:", "max_jiter:"))
    with pytest.raises(ConfigError, match="unknown keys.*max_jiter"):
        load_profile("typo", root=tmp_path)
    write_profile(tmp_path, "short", "extends: default\nbook: {dpi: 50}\n")
    (tmp_path / "profiles" / "default.yaml").write_text(base.replace("  dpi: 100\n", ""))
    assert load_profile("short", root=tmp_path).book.dpi == 50
    with pytest.raises(ConfigError, match="book.dpi: missing"):
        load_profile("default", root=tmp_path)


def test_circular_extends_raises(tmp_path):
    write_profile(tmp_path, "a", "extends: b\n")
    write_profile(tmp_path, "b", "extends: a\n")
    with pytest.raises(ConfigError, match="circular"):
        load_profile("a", root=tmp_path)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match="smoke"):
        load_profile("nope")


def test_config_hash_is_stable_and_ignores_speed_only_settings():
    a = load_profile("default")
    assert a.config_hash() == load_profile("default").config_hash()
    # the same settings in a different key order give the same hash
    assert a.config_hash() == load_profile("default", {"seed": a.seed}).config_hash()
    assert load_profile("default", {"mock.workers": 1}).config_hash() == a.config_hash()
    assert load_profile("default", {"mock.seed": 1}).config_hash() != a.config_hash()
    assert json.loads(json.dumps(a.to_dict()))  # plain data all the way down


def test_apply_overrides_does_not_touch_its_input():
    raw = {"mock": {"seed": 1}}
    assert apply_overrides(raw, {"mock.seed": 2}) == {"mock": {"seed": 2}}
    assert raw == {"mock": {"seed": 1}}


def test_parse_override_reads_yaml_values():
    assert parse_override("mock.seed=7") == ("mock.seed", 7)
    assert parse_override("data.root=/scratch/sdss") == ("data.root", "/scratch/sdss")
    assert parse_override("augment.enabled=[jitter_crop]") == ("augment.enabled", ["jitter_crop"])
    with pytest.raises(ConfigError):
        parse_override("mock.seed")


def test_flat_lists_every_setting():
    flat = load_profile("smoke").flat()
    assert flat["mock.n_galaxies"] == 400
    assert flat["data.split.test"] == 0.2
    assert "overrides" not in flat


# --------------------------------------------------------------------------- provenance
def test_run_paths_and_metrics_round_trip(tmp_path):
    profile = load_profile("smoke")
    paths = run_paths(profile, tmp_path)
    assert paths.root == tmp_path / "smoke"
    prov = Provenance.of(profile)
    out = write_metrics("data", {"median_z": 0.1, "counts": [1, 2], "bad": float("nan")}, paths, prov)
    record = json.loads(out.read_text())
    assert record["provenance"]["config_hash"] == profile.config_hash()
    assert read_metrics("data", paths) == {"median_z": 0.1, "counts": [1, 2], "bad": None}
    assert mock_fingerprint(paths) is None  # no mock made yet


def test_downstream_only_overrides_reuse_the_profiles_upstream_artifacts(tmp_path):
    base = run_paths(load_profile("smoke"), tmp_path)
    assert base.upstream == base.root == tmp_path / "smoke"
    # a downstream setting: results of their own, the profile's mock, checkpoint and representations
    longer = load_profile("smoke", {"photoz.finetune.max_steps": 9, "morphology.label_counts": [8]})
    paths = run_paths(longer, tmp_path)
    assert paths.root == tmp_path / longer.run_name != base.root
    assert longer.upstream_name == "smoke"
    for name in ("mock", "splits", "stats", "moco_checkpoint", "representations"):
        assert getattr(paths, name) == getattr(base, name), name
    assert paths.downstream != base.downstream and paths.metrics != base.metrics
    assert paths.ablation_checkpoints != base.ablation_checkpoints
    # an upstream setting: new upstream artifacts, shared by runs that differ downstream only
    reseeded = load_profile("smoke", {"pretrain.seed": 7})
    both = load_profile("smoke", {"pretrain.seed": 7, "photoz.fractions": [1.0]})
    assert reseeded.upstream_name == both.upstream_name == f"smoke-{reseeded.upstream_hash()}" != "smoke"
    assert run_paths(reseeded, tmp_path).mock == run_paths(both, tmp_path).mock != base.mock
    assert reseeded.run_name != both.run_name
    assert load_profile("smoke", {"representations.dtype": "float32"}).upstream_name != "smoke"
    assert load_profile("smoke", {"representations.neighbours": 3}).upstream_name == "smoke"


def test_provenance_line_names_profile_seed_commit_and_hash():
    profile = load_profile("smoke", {"mock.seed": 3})
    line = Provenance.of(profile).line()
    for part in ("MOCK", f"profile {profile.run_name}", "seed 2021", "mock seed 3", "commit ",
                 f"config {profile.config_hash()}"):
        assert part in line
    assert "real SDSS" in Provenance.of(load_profile("paper")).line()


def test_table_rounds_numbers_and_carries_provenance():
    prov = Provenance.of(load_profile("smoke"))
    table = Table(("name", "value"), (("pi", 3.14159265), ("n", 12345), ("none", None)), prov, digits=3)
    text = str(table)
    assert "3.14 " in text + " " and "12,345" in text and prov.line() in text
    assert "| pi | 3.14 |" in table._repr_markdown_()
