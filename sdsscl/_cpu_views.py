"""Compiled CPU kernel of :class:`sdsscl.augment.AugmentationPipeline` (numba, imported on first use).

On a GPU the pipeline is a handful of whole-batch torch kernels. On a CPU, torch runs each step
as a separate pass over memory (the blur alone is 2 x (2r + 1) passes), which leaves a 2-core
machine waiting on memory rather than computing. Here each image goes through every step while
its pixels stay in the core's cache:

1. the PSF blur (separable, zero outside the image) of only the pixels its resampling reads;
2. the fused rotation and crop: bilinear samples of that window (zero outside the image),
   or the integer crop without rotation;
3. ``out = noise * gamma + sample * factor`` in place in the noise field (reddening, noise).

Each image is computed on its own, in a fixed order of operations, so its view does not depend on
the batch it is in, on how the batch is split among threads, or on the number of threads. The
kernel holds no GIL (``nogil``): :mod:`sdsscl.augment` runs slices of the batch in its own
threads, together with drawing their noise. numba comes with ``umap-learn`` (the maps of
Section 3.1); the compiled code is cached next to this file.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def _blur(img, h, w, k, r, y0, y1, x0, x1, buf, by0, stride, pad):
    """Blur rows y0:y1, columns x0:x1 of the flat ``h x w`` plane ``img`` with the symmetric
    kernel ``k`` (2R + 1,) cut to half-width r (zero outside the plane), adding into ``buf``
    (zeroed; image row y, column x at ``(y - by0) * stride + pad + x``). Along y in flat
    loops over whole rows, then along x row by row (each loop a contiguous slice, which is
    what lets LLVM vectorise it)."""
    centre = (k.shape[0] - 1) // 2
    tmp = np.zeros((y1 - y0) * w, dtype=img.dtype)
    for d in range(-r, r + 1):                                   # along y
        lo, hi = max(y0, -d), min(y1, h - d)
        if lo < hi:
            kd = k[centre + d]
            dst = tmp[(lo - y0) * w:(hi - y0) * w]
            src = img[(lo + d) * w:(hi + d) * w]
            for q in range(dst.shape[0]):
                dst[q] += kd * src[q]
    for y in range(y0, y1):                                      # along x
        row = buf[(y - by0) * stride + pad:(y - by0) * stride + pad + w]
        src_row = tmp[(y - y0) * w:(y - y0 + 1) * w]
        for d in range(-r, r + 1):
            lo, hi = max(x0, -d), min(x1, w - d)
            if lo < hi:                          # (a negative end would count from the back)
                kd = k[centre + d]
                dst = row[lo:hi]
                src = src_row[lo + d:hi + d]
                for q in range(dst.shape[0]):
                    dst[q] += kd * src[q]


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def _copy(img, w, y0, y1, x0, x1, buf, by0, stride, pad):
    """Rows y0:y1, columns x0:x1 of the flat plane ``img`` into ``buf`` (laid out as in ``_blur``)."""
    for y in range(y0, y1):
        dst = buf[(y - by0) * stride + pad + x0:(y - by0) * stride + pad + x1]
        src = img[y * w + x0:y * w + x1]
        for q in range(dst.shape[0]):
            dst[q] = src[q]


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def views(x, src, pos, rotated, taps, radii, factor, gamma, noise, out, start, stop):
    """Views ``start:stop`` of ``out`` (B, C, Ho, Wo).

    x: the images (N, C, H, W), C-contiguous, float32 or float64 (``out``, ``taps``,
    ``factor`` and ``gamma`` in the same dtype); src (B,): the image of each view.
    pos (B, 2, 3) float64: output pixel (row i, column j) samples the image at column
    ``pos[b, 0] @ (j, i, 1)`` and row ``pos[b, 1] @ (j, i, 1)``; without rotation
    (``rotated`` False) only ``pos[b, :, 2]`` is read, the integer corner of the crop, which
    must lie inside the image. taps (B, C, 2R + 1): normalised PSF kernels, cut to each view's
    half-width ``radii`` (B,) (0: no blur). factor, gamma (B, C): the reddening factor and the
    noise standard deviation. noise: ``out`` holds a standard normal field, and the view is
    ``field * gamma + sample * factor``; else ``sample * factor``.
    """
    c_, h, w = x.shape[1], x.shape[2], x.shape[3]
    ho, wo = out.shape[2], out.shape[3]
    m = ho * wo
    for b in range(start, stop):
        a = pos[b]
        r = radii[b]
        # The window [wy0, wy1) x [wx0, wx1) of image pixels that the view reads: with rotation,
        # the bounding box of the output's corners with their bilinear neighbours, widened by a
        # pixel either side for the rounding of the positions in between.
        if rotated:
            ys = (a[1, 2], a[1, 2] + a[1, 0] * (wo - 1), a[1, 2] + a[1, 1] * (ho - 1),
                  a[1, 2] + a[1, 0] * (wo - 1) + a[1, 1] * (ho - 1))
            xs = (a[0, 2], a[0, 2] + a[0, 0] * (wo - 1), a[0, 2] + a[0, 1] * (ho - 1),
                  a[0, 2] + a[0, 0] * (wo - 1) + a[0, 1] * (ho - 1))
            wy0, wy1 = int(np.floor(min(ys))) - 1, int(np.floor(max(ys))) + 3
            wx0, wx1 = int(np.floor(min(xs))) - 1, int(np.floor(max(xs))) + 3
        else:
            wy0, wx0 = int(a[1, 2]), int(a[0, 2])
            wy1, wx1 = wy0 + ho, wx0 + wo
        y0, y1, x0, x1 = max(wy0, 0), min(wy1, h), max(wx0, 0), min(wx1, w)   # inside the image
        # The window's buffer: its rows, each a whole image row plus `pad` zero columns either
        # side; rows and columns outside the image stay zero.
        pad = max(0, -wx0, wx1 - w)
        stride = w + 2 * pad
        if rotated:            # per output pixel, shared by the bands: its top-left neighbour's
            index = np.empty(m, np.int64)                                # place in the window,
            fx, gx = np.empty(m, out.dtype), np.empty(m, out.dtype)      # the weights of the right
            fy, gy = np.empty(m, out.dtype), np.empty(m, out.dtype)      # and left, lower and upper
            for i in range(ho):
                xi, yi = a[0, 1] * i + a[0, 2], a[1, 1] * i + a[1, 2]
                s = slice(i * wo, (i + 1) * wo)
                row_index, row_fx, row_gx, row_fy, row_gy = index[s], fx[s], gx[s], fy[s], gy[s]
                for j in range(wo):
                    xj, yj = xi + a[0, 0] * j, yi + a[1, 0] * j
                    left, top = np.floor(xj), np.floor(yj)
                    row_fx[j], row_gx[j] = xj - left, 1.0 - (xj - left)
                    row_fy[j], row_gy[j] = yj - top, 1.0 - (yj - top)
                    row_index[j] = (int(top) - wy0) * stride + int(left) + pad
            v00, v01 = np.empty(m, out.dtype), np.empty(m, out.dtype)
            v10, v11 = np.empty(m, out.dtype), np.empty(m, out.dtype)
        for c in range(c_):
            img = x[src[b], c].reshape(h * w)
            buf = np.zeros((wy1 - wy0) * stride, dtype=x.dtype)
            if y0 < y1 and x0 < x1:
                if r > 0:
                    _blur(img, h, w, taps[b, c], r, y0, y1, x0, x1, buf, wy0, stride, pad)
                else:
                    _copy(img, w, y0, y1, x0, x1, buf, wy0, stride, pad)
            f, g = factor[b, c], gamma[b, c]
            dst = out[b, c].reshape(m)
            if rotated:
                for t in range(m):                                   # gathers, then arithmetic
                    q = index[t]
                    v00[t], v01[t] = buf[q], buf[q + 1]
                    v10[t], v11[t] = buf[q + stride], buf[q + stride + 1]
                if noise:
                    for t in range(m):
                        v = gy[t] * (gx[t] * v00[t] + fx[t] * v01[t]) + fy[t] * (gx[t] * v10[t] + fx[t] * v11[t])
                        dst[t] = dst[t] * g + v * f
                else:
                    for t in range(m):
                        v = gy[t] * (gx[t] * v00[t] + fx[t] * v01[t]) + fy[t] * (gx[t] * v10[t] + fx[t] * v11[t])
                        dst[t] = v * f
            else:
                for i in range(ho):
                    row = dst[i * wo:(i + 1) * wo]
                    sample = buf[i * stride + pad + wx0:i * stride + pad + wx0 + wo]
                    if noise:
                        for j in range(wo):
                            row[j] = row[j] * g + sample[j] * f
                    else:
                        for j in range(wo):
                            row[j] = sample[j] * f
