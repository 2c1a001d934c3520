"""Population tissue harmonization: the least-squares tissue-means normalization (LSQ).

intensity-normalization 3.x (``LSQNormalizer``) is the reference: each volume's three tissue
means (CSF, GM, WM: the membership-weighted means of a fuzzy c-means of the brain mask's
voxels, as ``FCMNormalizer``'s) are scaled by one factor onto a set of *standard* tissue means,
the factor that fits them best in the least-squares sense. The standard means are the first
volume's, divided by its CSF mean and multiplied by ``norm_value``.

Here the fit is one histogram pass over the cohort (volumes in parallel; per volume only its
histogram and three means reach the client, nothing per voxel), the fuzzy c-means runs on each
volume's histogram (:func:`volnorm.transforms.tissue.cmeans`), and the standard means are kept
in the parameters, so the same standard normalizes new volumes later (``standard=``, or a
pipeline's replay).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from volnorm._dims import volume_dims
from volnorm.params import Params, check
from volnorm.transforms.common import check_data
from volnorm.transforms.tissue import TISSUES, divide, fcm_tissues, per_volume_values

__all__ = ["fit_lsq", "lsq"]


def _standard(standard: Sequence[float] | None) -> np.ndarray | None:
    if standard is None:
        return None
    s = np.asarray(standard, dtype=np.float64).ravel()
    if s.shape != (len(TISSUES),) or not np.all(np.isfinite(s)):
        raise ValueError(f"standard={standard!r}: expected three finite tissue means (CSF, GM, WM)")
    return s


def fit_lsq(
    data: xr.DataArray, *, mask: xr.DataArray | None = None, norm_value: float = 1.0, standard: Sequence[float] | None = None,
    fuzziness: float = 2.0, error: float = 0.005, max_iter: int = 50, seed: int = 0,
) -> Params:
    """Fit :func:`lsq`: the standard tissue means and, per volume, its tissue means and its
    least-squares scale. Computes: one histogram pass over the cohort.

    Per volume, the tissue means ``t`` (CSF, GM, WM) are the membership-weighted means of a
    fuzzy c-means of the brain mask's voxels, exactly as :func:`~volnorm.fit_fcm` computes them
    (same options, same seeded start; equal to the reference's as that docstring says). The
    standard means ``s`` are, as the reference's ``fit_population``, the *first* volume's
    divided by its CSF mean, times ``norm_value`` (or ``standard``, e.g. from an earlier fit).
    Each volume's scale is ``(t·t) / (t·s)``, what the reference divides it by.

    Parameters
    ----------
    data : xarray.DataArray
        A stack (``("volume", ...)``), numpy or dask backed.
    mask : xarray.DataArray of bool
        Required: a brain mask broadcastable to ``data``.
    norm_value : float
        The standard CSF mean (the reference's ``norm_value``, default 1).
    standard : sequence of 3 float, optional
        Standard CSF, GM, WM means to use instead of the first volume's (``norm_value`` is then
        not used).
    fuzziness : float
        skfuzzy's ``m`` (> 1).
    error : float
        skfuzzy's stopping rule (> 0).
    max_iter : int
        At most this many steps (>= 1).
    seed : int
        The start's random memberships.

    Returns
    -------
    Params
        Method ``"lsq"``: ``standard`` (dim ``tissue``), per volume float64 ``scale`` and per
        volume and tissue ``tissue_means``; the options record which volume set the standard
        (``standard_from``).

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> a = np.array([[10, 11, 12, 50, 52, 90, 91, 93], [20, 22, 24, 100, 104, 180, 182, 186]], dtype="int16")
    >>> x = xr.DataArray(a, dims=("volume", "x"))
    >>> p = vn.fit_lsq(x, mask=x > 0)
    >>> np.round(p.values["standard"].values, 3).tolist(), np.round(p.values["scale"].values, 3).tolist()
    ([1.0, 4.624, 8.274], [11.036, 22.072])
    """
    data = check_data(data)
    given = _standard(standard)
    h, _, means, _ = fcm_tissues(data, mask, name="lsq", fuzziness=fuzziness, error=error, max_iter=max_iter, seed=seed)
    means = means.reshape(-1, len(TISSUES))
    if given is None:
        if means[0, 0] == 0:
            raise ValueError("lsq: the first volume's CSF mean is 0: cannot set the standard tissue means from it")
        given = means[0] / means[0, 0] * norm_value
        origin = f"volume {data['volume'].values[0] if 'volume' in data.coords else 0}"
    else:
        origin = "given"
    den = means @ given
    if np.any(den == 0):
        raise ValueError("lsq: a volume's tissue means are orthogonal to the standard means (t·s = 0): no scale fits")
    scale = np.einsum("ij,ij->i", means, means) / den
    if np.any(scale == 0):
        raise ValueError("lsq: a volume's tissue means are all 0: cannot scale it")
    ds = per_volume_values(h, scale=scale, tissue_means=means).assign(standard=("tissue", given))
    options = {"dim": list(volume_dims(data)), "norm_value": norm_value, "standard": None if standard is None else given.tolist(),
               "fuzziness": fuzziness, "error": error, "max_iter": max_iter, "seed": seed, "standard_from": origin}
    return Params("lsq", ds, options)


def lsq(
    data: xr.DataArray, *, mask: xr.DataArray | None = None, norm_value: float = 1.0, standard: Sequence[float] | None = None,
    fuzziness: float = 2.0, error: float = 0.005, max_iter: int = 50, seed: int = 0, params: Params | None = None,
) -> xr.DataArray:
    """Least-squares tissue-means harmonization: ``x / scale`` per volume, with the scale that
    maps its CSF/GM/WM means onto the standard tissue means (:func:`fit_lsq`;
    intensity-normalization 3.x's ``LSQNormalizer`` is the reference). Lazy; computes the fit
    pass.

    Parameters
    ----------
    data : xarray.DataArray
        A stack, numpy or dask backed.
    mask : xarray.DataArray of bool
        Required without ``params``: a brain mask broadcastable to ``data``.
    norm_value : float
        The standard CSF mean (default 1).
    standard : sequence of 3 float, optional
        Standard CSF, GM, WM means (default: the first volume's, as the reference).
    fuzziness : float
        skfuzzy's ``m`` (> 1).
    error : float
        skfuzzy's stopping rule (> 0).
    max_iter : int
        At most this many steps (>= 1).
    seed : int
        The start's random memberships.
    params : Params, optional
        From :func:`fit_lsq` on the same stack: no fit pass. (For new volumes, give
        ``standard=params.values["standard"]`` instead: their own tissue means are fitted.)

    Returns
    -------
    xarray.DataArray
        float32 for float32 and up to 16-bit integer input, float64 otherwise.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> a = np.array([[10, 11, 12, 50, 52, 90, 91, 93], [20, 22, 24, 100, 104, 180, 182, 186]], dtype="int16")
    >>> x = xr.DataArray(a, dims=("volume", "x"))
    >>> y = vn.lsq(x, mask=x > 0)
    >>> bool(np.allclose(y[0], y[1])), round(float(y[0, -1]), 3)
    (True, 8.427)
    """
    data = check_data(data)
    if params is None:
        params = fit_lsq(data, mask=mask, norm_value=norm_value, standard=standard, fuzziness=fuzziness, error=error,
                         max_iter=max_iter, seed=seed)
    else:
        check(params, lsq, data, norm_value=norm_value, standard=None if standard is None else _standard(standard).tolist(),
              fuzziness=fuzziness, error=error, max_iter=max_iter, seed=seed)
    return divide(data, params.values["scale"], params)
