"""Tests for sdsscl.plotting (Lupton RGB thumbnails)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from sdsscl.plotting import lupton_rgb, show_galaxies


def galaxy(i_boost=1.0, size=107, seed=0):
    """A round exponential galaxy, ~10 nmgy peak, with sky noise (ugriz, nanomaggies)."""
    yy, xx = np.mgrid[:size, :size] - size // 2
    profile = 10.0 * np.exp(-np.hypot(xx, yy) / 4.0)
    colour = np.array([0.3, 0.6, 1.0, 1.2 * i_boost, 1.4])
    noise = np.random.default_rng(seed).normal(0, 0.03, (5, size, size))
    return (colour[:, None, None] * profile + noise).astype(np.float32)


def test_lupton_shapes_dtype_and_torch():
    single = lupton_rgb(galaxy())
    assert single.dtype == np.uint8 and single.shape == (107, 107, 3)
    assert single.max() > 100  # the galaxy is visible
    batch = np.stack([galaxy(seed=s) for s in range(3)])
    out = lupton_rgb(batch)
    assert out.dtype == np.uint8 and out.shape == (3, 107, 107, 3)
    np.testing.assert_array_equal(out[0], single)
    np.testing.assert_array_equal(lupton_rgb(torch.from_numpy(batch)), out)
    with pytest.raises(ValueError):
        lupton_rgb(batch[:, :3])


def test_brighter_i_band_is_redder():
    plain, red = lupton_rgb(galaxy()), lupton_rgb(galaxy(i_boost=3.0))
    assert red[..., 0].mean() > plain[..., 0].mean()
    assert (red[..., 0].astype(float) - red[..., 2]).mean() > (plain[..., 0].astype(float) - plain[..., 2]).mean()


def test_lupton_non_finite_pixels_are_black():
    img = galaxy()
    img[:, 0, 0] = np.nan
    out = lupton_rgb(img)
    assert (out[0, 0] == 0).all()


def test_show_galaxies_axes_titles_and_crop_box():
    images = np.stack([galaxy(seed=s) for s in range(5)])
    fig = show_galaxies(images, titles=[f"g{k}" for k in range(5)], ncols=3, crop_box=64)
    assert isinstance(fig, Figure) and len(fig.axes) == 5
    assert fig.axes[4].get_title() == "g4"
    box = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert len(box) == 1 and box[0].get_width() == 64 and box[0].get_xy() == (20.5, 20.5)
    one = show_galaxies(torch.from_numpy(images[0]))
    assert len(one.axes) == 1 and not one.axes[0].patches
    with pytest.raises(ValueError, match="titles"):
        show_galaxies(images, titles=["a"])
