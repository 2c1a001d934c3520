"""GIL-free histogram kernels (numba ``nogil``), one call per chunk.

``np.histogram``/``np.bincount`` hold the GIL and gained nothing from a second
thread here (DESIGN.md, Scale rules); these kernels run at several GB/s per
thread and never fold NaN, ±Inf or out-of-range values into the edge bins:
those are counted apart.

Every kernel fills ``out`` of shape ``(rows, nbins + NEXTRA)``: one histogram
per row of a ``(rows, n)`` view, then the extra counters in ``EXTRA`` order.
"""

from __future__ import annotations

import numba
import numpy as np

#: Counters kept beside the bins, in this order.
EXTRA = ("nan", "posinf", "neginf", "below", "above", "masked_out")
NEXTRA = len(EXTRA)


@numba.njit(nogil=True, cache=True)
def hist_int(x, lo, nbins, out, m=None, w=None):  # pragma: no cover - compiled
    """One bin per integer in ``[lo, lo + nbins)``; ``x`` is ``(rows, n)``; ``m`` masks voxels out;
    ``w`` (float64, like ``x``) weights the bins (the extra counters still count voxels).

    One unsigned comparison decides "in range" (``k < 0`` wraps to a huge unsigned value):
    measured 2.9 GB/s per thread on uint16 against 2.1 with two signed tests."""
    nb = np.uint64(nbins)
    for r in range(x.shape[0]):
        row = out[r]
        xr = x[r]
        for i in range(xr.shape[0]):
            if m is not None and not m[r, i]:
                row[nbins + 5] += 1
                continue
            k = np.int64(xr[i]) - lo
            if np.uint64(k) < nb:
                if w is None:
                    row[k] += 1
                else:
                    row[k] += w[r, i]
            elif k < 0:
                row[nbins + 3] += 1
            else:
                row[nbins + 4] += 1


@numba.njit(nogil=True, cache=True)
def hist_byte(x, signed, lo, nbins, out):  # pragma: no cover - compiled
    """:func:`hist_int` for 1-byte data (``x`` the ``uint8`` view of uint8, int8 or bool; no mask,
    no weights): count the 256 byte values in four interleaved tables (equal neighbours do not
    wait on one counter), then fold them into the bins. 2.2x faster than ``hist_int`` on
    96x96 uint8 images (3.3 against 7.2 ms for 1000 of them, one thread)."""
    tmp = np.zeros((4, 256), dtype=np.int64)
    n = x.shape[1]
    for r in range(x.shape[0]):
        xr = x[r]
        tmp[:] = 0
        i = 0
        while i + 4 <= n:
            tmp[0, xr[i]] += 1
            tmp[1, xr[i + 1]] += 1
            tmp[2, xr[i + 2]] += 1
            tmp[3, xr[i + 3]] += 1
            i += 4
        while i < n:
            tmp[0, xr[i]] += 1
            i += 1
        row = out[r]
        for b in range(256):
            c = tmp[0, b] + tmp[1, b] + tmp[2, b] + tmp[3, b]
            if c == 0:
                continue
            k = (b - 256 if signed and b >= 128 else b) - lo
            if 0 <= k < nbins:
                row[k] += c
            elif k < 0:
                row[nbins + 3] += c
            else:
                row[nbins + 4] += c


def edge_slack(edges: np.ndarray) -> float:
    """How far (in bins) the actual edges stray from ``lo + k * width``, plus the rounding of
    the bin position: a voxel whose position is farther than this from an integer is binned
    without looking at the edges (``hist_float``'s fast path); others are checked against them."""
    nbins = len(edges) - 1
    ideal = edges[0] + np.arange(nbins + 1) * ((edges[-1] - edges[0]) / nbins)
    return float(np.max(np.abs(edges - ideal)) * nbins / (edges[-1] - edges[0])) + 1e-8


@numba.njit(nogil=True, cache=True)
def hist_float(x, edges, out, m=None, w=None, slack=0.5):  # pragma: no cover - compiled
    """Equal bins on ``edges`` (float64 values of numpy's edges), last bin closed: np.histogram's bins.

    The bin is ``int((v - lo) * nbins / (hi - lo))``; only when that position lies within
    ``slack`` (see :func:`edge_slack`) of a bin boundary is it corrected against the edges, as
    numpy does, so every voxel lands where ``np.histogram`` puts it. ``m`` (bool, like ``x``)
    excludes voxels (counted as ``masked_out``); ``w`` weights the bins as in :func:`hist_int`.
    Written as one loop: a helper function per voxel ran 10x slower here.
    """
    nbins = edges.shape[0] - 1
    lo = edges[0]
    hi = edges[nbins]
    scale = nbins / (hi - lo)
    for r in range(x.shape[0]):
        row = out[r]
        xr = x[r]
        for i in range(xr.shape[0]):
            if m is not None and not m[r, i]:
                row[nbins + 5] += 1
                continue
            v = np.float64(xr[i])
            t = (v - lo) * scale
            if t >= 0.0 and t < nbins:  # the common case; NaN fails both tests
                k = np.int64(t)
                f = t - np.float64(k)
                if f < slack or f > 1.0 - slack:  # near a boundary: numpy's correction
                    if v < edges[k]:
                        k -= 1
                    elif k != nbins - 1 and v >= edges[k + 1]:
                        k += 1
            elif v >= lo and v <= hi:  # v == hi, or rounding put it at nbins: the closed last bin
                k = nbins - 1
                if v < edges[k]:
                    k -= 1
            else:
                if v != v:
                    row[nbins] += 1
                elif v == np.inf:
                    row[nbins + 1] += 1
                elif v == -np.inf:
                    row[nbins + 2] += 1
                elif v < lo:
                    row[nbins + 3] += 1
                else:
                    row[nbins + 4] += 1
                continue
            if w is None:
                row[k] += 1
            else:
                row[k] += w[r, i]


#: Bytes of count rows per tile of the per-voxel kernel: they stay in the L1 cache while every volume passes.
VOXEL_TILE_BYTES = 24 * 1024


@numba.njit(nogil=True, cache=True)
def voxel_hist(xs, lo, nbins, edges, slack, lut, counts, extra, ms=None):  # pragma: no cover - compiled
    """One histogram per voxel across volumes: ``xs`` is a list of ``(volumes, voxels)`` blocks
    as stored (no transpose, no concatenation); ``counts`` ``(voxels, nbins)`` and ``extra``
    ``(voxels, NEXTRA)`` (the counters), of one small unsigned dtype, are written, not added
    to; ``ms`` the blocks' masks (or None). Integer bins (one per value from ``lo``) when
    ``edges`` is empty, else numpy's bins on ``edges`` exactly as :func:`hist_float` finds
    them; ``lut`` (non-empty for 8/16-bit integers on float bins) gives the bin or counter of
    each value from ``lo`` directly.

    A tile of :data:`VOXEL_TILE_BYTES` of count rows (bins and counters) stays in cache while
    every volume of every block streams its values of the tile through (one volume at a time
    would sweep all the counts per volume: 5x slower), then goes out to ``counts`` and
    ``extra``: the outputs need no zeroing and come out contiguous, bins apart from counters
    (slicing the counters out of 106-byte rows afterwards cost 0.5 s per 2.25 M voxels).

    Per volume and tile, a branch-free pass finds each voxel's offset in the tile's counts
    (int32, so that it vectorizes), or -1 for a float close to an edge or outside the bins; a
    second pass counts; a third, only when some are -1, bins those as :func:`hist_float` does
    (its lines repeated on purpose: as a shared numba function both kernels ran 2-4x slower).
    Measured 2026-11-30 on one thread against the previous one-pass loop: float32 1.1 -> 1.6
    GB/s, with a mask 0.16 -> 1.4, uint8 on integer bins 0.26 -> 0.79, int16 0.35 -> 1.5,
    uint8 through ``lut`` 0.51 -> 0.61."""
    ns = counts.shape[0]
    w = nbins + extra.shape[1]
    tile = max(8, VOXEL_TILE_BYTES // (w * counts.itemsize))
    use_lut = lut.shape[0] > 0
    is_int = edges.shape[0] == 0
    elo = edges[0] if not is_int else 0.0
    ehi = edges[nbins] if not is_int else 1.0
    scale = nbins / (ehi - elo)
    o = np.zeros(tile * w, counts.dtype)
    kbuf = np.empty(tile, np.int32)
    lut32 = lut.astype(np.int32)
    nb32 = np.int32(nbins)
    w32 = np.int32(w)
    for s0 in range(0, ns, tile):
        s1 = min(s0 + tile, ns)
        n = s1 - s0
        o[: n * w] = 0
        for b in range(len(xs)):
            x = xs[b]
            for v in range(x.shape[0]):
                xv = x[v, s0:s1]
                if use_lut:  # 1. the offsets
                    for i in range(n):
                        kbuf[i] = np.int32(i) * w32 + lut32[np.int64(xv[i]) - lo]
                elif is_int:
                    for i in range(n):
                        k = np.int64(xv[i]) - lo
                        c = np.int32(k) if (k >= 0) & (k < nbins) else (nb32 + 3 if k < 0 else nb32 + 4)
                        kbuf[i] = np.int32(i) * w32 + c
                else:
                    for i in range(n):
                        t = (np.float64(xv[i]) - elo) * scale
                        ok = (t >= 0.0) & (t < nbins)  # NaN fails both tests
                        tt = t if ok else 0.0
                        k = np.int32(tt)
                        f = tt - np.float64(k)
                        good = ok & (f >= slack) & (f <= 1.0 - slack)  # near an edge: numpy's correction, below
                        kbuf[i] = np.int32(i) * w32 + k if good else np.int32(-1)
                if ms is not None:
                    mv = ms[b][v, s0:s1]
                    for i in range(n):
                        kbuf[i] = kbuf[i] if mv[i] else np.int32(i) * w32 + nb32 + 5
                bad = 0  # 2. the counts
                for i in range(n):
                    k = kbuf[i]
                    if k >= 0:
                        o[k] += 1
                    else:
                        bad += 1
                if bad == 0:
                    continue
                for i in range(n):  # 3. floats near an edge or outside the bins
                    if kbuf[i] >= 0:
                        continue
                    row = o[i * w : (i + 1) * w]
                    val = np.float64(xv[i])
                    t = (val - elo) * scale
                    if t >= 0.0 and t < nbins:
                        k = np.int64(t)
                        if val < edges[k]:
                            k -= 1
                        elif k != nbins - 1 and val >= edges[k + 1]:
                            k += 1
                        row[k] += 1
                    elif val >= elo and val <= ehi:  # the closed last bin
                        k = nbins - 1
                        if val < edges[k]:
                            k -= 1
                        row[k] += 1
                    elif val != val:
                        row[nbins] += 1
                    elif val == np.inf:
                        row[nbins + 1] += 1
                    elif val == -np.inf:
                        row[nbins + 2] += 1
                    elif val < elo:
                        row[nbins + 3] += 1
                    else:
                        row[nbins + 4] += 1
        for i in range(n):
            counts[s0 + i] = o[i * w : i * w + nbins]
            extra[s0 + i] = o[i * w + nbins : (i + 1) * w]


@numba.njit(nogil=True, cache=True)
def minmax(x, out, m=None):  # pragma: no cover - compiled
    """NaN/Inf-ignoring (min, max) of a flat array, merged into ``out`` (start it at inf, -inf for
    floats, at the dtype's (max, min) for integers; same dtype as ``x``); ``m`` keeps the voxels inside.

    Plain comparisons (NaN fails them, so it never becomes the min or max) vectorize: 10 GB/s
    per thread on float32; only a block whose result is infinite is scanned again, slowly,
    to leave ±Inf out."""
    lo = out[0]
    hi = out[1]
    for i in range(x.shape[0]):
        if m is not None and not m[i]:
            continue
        v = x[i]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    if lo == -np.inf or hi == np.inf:
        lo = out[0]
        hi = out[1]
        for i in range(x.shape[0]):
            if m is not None and not m[i]:
                continue
            v = x[i]
            if v != np.inf and v != -np.inf:
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
    out[0] = lo
    out[1] = hi


#: Columns of :func:`moments`' output.
MOMENTS = ("count", "mean", "m2", "min", "max", "nan", "posinf", "neginf", "masked_out")


#: Voxels summed in an inner accumulator before it is added to the outer one (two-level
#: summation: rounding error ~ (BLOCK + n / BLOCK) ulp instead of n ulp).
SUM_BLOCK = 1024


@numba.njit(nogil=True, cache=True)
def moments(x, out, m=None):  # pragma: no cover - compiled
    """Per row of ``x`` (rows, n): count, mean, M2, min, max of the finite unmasked values, and
    the NaN/+Inf/-Inf/masked-out counts, into ``out`` (rows, 9).

    Two passes over the row in float64 (the mean, then the sum of squared deviations with
    the usual correction term), each summed in blocks of ``SUM_BLOCK`` so that the rounding
    error does not grow with the chunk (a plain running sum lost 5e-12 relative on 600 k
    voxels); no division per voxel (Welford's ran at 0.6 GB/s per thread). Rows merge with
    Chan's update."""
    for r in range(x.shape[0]):
        xr = x[r]
        n = 0
        s = 0.0
        sb = 0.0
        lo = np.inf
        hi = -np.inf
        nan = 0
        pinf = 0
        ninf = 0
        masked = 0
        for i in range(xr.shape[0]):
            if i % SUM_BLOCK == 0:
                s += sb
                sb = 0.0
            if m is not None and not m[r, i]:
                masked += 1
                continue
            v = np.float64(xr[i])
            if v - v == 0.0:  # finite
                n += 1
                sb += v
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
            elif v != v:
                nan += 1
            elif v > 0:
                pinf += 1
            else:
                ninf += 1
        s += sb
        mean = s / n if n > 0 else 0.0
        m2 = 0.0
        c = 0.0
        if n > 0:
            m2b = 0.0
            cb = 0.0
            for i in range(xr.shape[0]):
                if i % SUM_BLOCK == 0:
                    m2 += m2b
                    c += cb
                    m2b = 0.0
                    cb = 0.0
                if m is not None and not m[r, i]:
                    continue
                v = np.float64(xr[i])
                if v - v == 0.0:
                    d = v - mean
                    m2b += d * d
                    cb += d
            m2 += m2b
            c += cb
            m2 -= c * c / n
            mean += c / n
        o = out[r]
        o[0] = n
        o[1] = mean
        o[2] = m2
        o[3] = lo
        o[4] = hi
        o[5] = nan
        o[6] = pinf
        o[7] = ninf
        o[8] = masked


@numba.njit(nogil=True, cache=True)
def pick_bins(x, ilo, ihi, at_lo, m=None):  # pragma: no cover - compiled
    """The values of ``x`` (rows, n) inside the half-open intervals ``[ilo[r, k], ihi[r, k])`` of
    their row (empty ones padded with ``ilo = inf``), with the interval index and row; two passes
    (count, fill), no copy of ``x``. Values equal to the lower bound are only counted, in
    ``at_lo[r, k]`` (repeated values - zeros, integral floats - cost no memory). The intervals
    are the few histogram bins that hold requested ranks, so quantiles can be refined."""
    nk = ilo.shape[1]
    n = 0
    vals = np.empty(0, dtype=np.float64)
    which = np.empty(0, dtype=np.int64)
    rows = np.empty(0, dtype=np.int64)
    for step in range(2):
        if step == 1:
            vals = np.empty(n, dtype=np.float64)
            which = np.empty(n, dtype=np.int64)
            rows = np.empty(n, dtype=np.int64)
            n = 0
        for r in range(x.shape[0]):
            xr = x[r]
            lo = np.inf
            hi = -np.inf
            for k in range(nk):
                if ilo[r, k] < lo:
                    lo = ilo[r, k]
                if ihi[r, k] > hi:
                    hi = ihi[r, k]
            for i in range(xr.shape[0]):
                v = np.float64(xr[i])
                if not (v >= lo and v < hi):  # most voxels; NaN too
                    continue
                if m is not None and not m[r, i]:
                    continue
                for k in range(nk):
                    if v >= ilo[r, k] and v < ihi[r, k]:
                        if v == ilo[r, k]:
                            if step == 0:
                                at_lo[r, k] += 1
                        else:
                            if step == 1:
                                vals[n] = v
                                which[n] = k
                                rows[n] = r
                            n += 1
                        break
    return vals, which, rows


@numba.njit(nogil=True, cache=True)
def hist_fsl(x, fa, fb, nbins, out, m=None):  # pragma: no cover - compiled
    """FSL's ``find_histogram``: bin ``(int)(fa * v + fb)`` (C truncation) clamped to
    ``[0, nbins - 1]``, ``v`` the voxel as a float32 (FSL reads images as float).
    Non-finite voxels are skipped and counted in ``out[nbins]``; masked-out ones are skipped."""
    for i in range(x.shape[0]):
        if m is not None and not m[i]:
            continue
        v = np.float64(np.float32(x[i]))
        if not (v == v and v != np.inf and v != -np.inf):
            out[nbins] += 1
            continue
        t = fa * v + fb
        if t >= nbins:
            k = nbins - 1
        elif t < 0:
            k = np.int64(t)  # truncation toward zero: (-1, 0) -> 0
            if k < 0:
                k = 0
        else:
            k = np.int64(t)
            if k > nbins - 1:
                k = nbins - 1
        out[k] += 1


@numba.njit(nogil=True, cache=True)
def key_hist(xu, x, shift, out, m=None):  # pragma: no cover - compiled
    """Histogram of the order-preserving keys of float voxels, one per row of ``x`` (rows, n):
    ``xu`` is ``x`` viewed as unsigned integers of the same width; ``key = ~u`` for negative
    values, ``u | top bit`` otherwise, sorts as the values do (-0.0 just below +0.0); bin =
    key >> shift. ``out[r, -4:]`` count NaN, +Inf, -Inf and masked-out voxels. No range pass is
    needed: the bins cover every float, finest near each value's magnitude (relative width
    2**(shift - mantissa bits))."""
    nb = out.shape[1] - 4
    nbits = xu.dtype.type(8 * xu.itemsize - 1)
    top = xu.dtype.type(1) << nbits
    for r in range(x.shape[0]):
        row = out[r]
        xr = x[r]
        ur = xu[r]
        for i in range(xr.shape[0]):
            if m is not None and not m[r, i]:
                row[nb + 3] += 1
                continue
            v = xr[i]
            if v - v != 0:  # NaN or ±Inf: the rare path
                if v != v:
                    row[nb] += 1
                elif v > 0:
                    row[nb + 1] += 1
                else:
                    row[nb + 2] += 1
                continue
            u = ur[i]
            key = ~u if u & top else u | top
            row[np.int64(key >> shift)] += 1


@numba.njit(nogil=True, cache=True)
def pick_keys(xu, x, shift, slot, ilo, at_lo, cap, m=None):  # pragma: no cover - compiled
    """The voxels of row ``r`` whose :func:`key_hist` bin ``b`` has ``slot[r, b] >= 0``, with
    that slot (slots number the wanted bins of all rows); values equal to the slot's lower
    bound ``ilo[slot]`` are only counted in ``at_lo[slot]``. The bin is found exactly as
    :func:`key_hist` finds it: one table look-up per voxel. ``cap`` (an upper bound on the
    voxels kept, known from the histogram) lets one pass fill a buffer; ``cap < 0`` counts
    first, then fills. Returns ``(values, slots, n)``; ``n > cap >= 0`` means the bound was
    wrong and nothing was kept."""
    nbits = xu.dtype.type(8 * xu.itemsize - 1)
    top = xu.dtype.type(1) << nbits
    n = 0
    vals = np.empty(max(cap, 0), dtype=np.float64)
    which = np.empty(max(cap, 0), dtype=np.int64)
    for step in range(2):
        if step == 0 and cap >= 0:
            continue
        if step == 1 and cap < 0:
            vals = np.empty(n, dtype=np.float64)
            which = np.empty(n, dtype=np.int64)
            at_lo[:] = 0
        n = 0
        for r in range(x.shape[0]):
            xr = x[r]
            ur = xu[r]
            sr = slot[r]
            for i in range(xr.shape[0]):
                v = xr[i]
                if v - v != 0:
                    continue
                u = ur[i]
                key = ~u if u & top else u | top
                s = sr[np.int64(key >> shift)]
                if s < 0:
                    continue
                if m is not None and not m[r, i]:
                    continue
                if v == ilo[s]:
                    at_lo[s] += 1
                else:
                    if step == 1 and n < vals.shape[0]:
                        vals[n] = v
                        which[n] = s
                    n += 1
    if n > vals.shape[0]:  # more than ``cap``: the caller runs again with cap < 0
        return vals[:0].copy(), which[:0].copy(), n
    return vals[:n].copy(), which[:n].copy(), n


@numba.njit(nogil=True, cache=True)
def floyd_steinberg(x, out):  # pragma: no cover - compiled
    """Error diffusion (Floyd & Steinberg 1976) of planes ``x`` (n, rows, cols) in [0, 1] to {0, 1},
    raster order, weights 7/16, 3/16, 5/16, 1/16; NaN stays 0 and passes no error."""
    for p in range(x.shape[0]):
        err = x[p].astype(np.float64)
        rows, cols = err.shape
        for i in range(rows):
            for j in range(cols):
                v = err[i, j]
                if v != v:
                    out[p, i, j] = 0
                    continue
                q = 1.0 if v >= 0.5 else 0.0
                out[p, i, j] = q
                e = v - q
                if j + 1 < cols:
                    err[i, j + 1] += e * 7.0 / 16.0
                if i + 1 < rows:
                    if j > 0:
                        err[i + 1, j - 1] += e * 3.0 / 16.0
                    err[i + 1, j] += e * 5.0 / 16.0
                    if j + 1 < cols:
                        err[i + 1, j + 1] += e * 1.0 / 16.0


@numba.njit(nogil=True, cache=True)
def lut_rows(x, lut, lo, out):  # pragma: no cover - compiled
    """``out[r, i] = lut[r, clip(x[r, i] - lo, 0, len - 1)]``: a per-row look-up table for integer
    data, without the int64 index array a numpy gather needs."""
    n = lut.shape[1]
    for r in range(x.shape[0]):
        xr = x[r]
        t = lut[r]
        o = out[r]
        for i in range(xr.shape[0]):
            k = np.int64(xr[i]) - lo
            if k < 0:
                k = 0
            elif k >= n:
                k = n - 1
            o[i] = t[k]


@numba.njit(nogil=True, cache=True)
def gather_rows(x, lut, out):  # pragma: no cover - compiled
    """``out[r, i] = lut[r, x[r, i]]`` for ``x`` the ``uint8`` view of 1-byte data and a 256-entry
    table per row: :func:`lut_rows` without the clipping (1.8x faster)."""
    for r in range(x.shape[0]):
        xr = x[r]
        t = lut[r]
        o = out[r]
        for i in range(xr.shape[0]):
            o[i] = t[xr[i]]
