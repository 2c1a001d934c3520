"""Colour: greyscale conversion, colormaps and their inverse, palettes, lazily and block by block.

Colour data carry a ``channel`` dim (R, G, B[, A]); results keep the input's other dims and
chunks. Matplotlib provides the colormaps (the ``volnorm[plot]`` extra); no figure is made.
One module per concern: ``grey`` (luma, perceived brightness, exposure; the channel rules),
``colormaps`` (apply, invert), ``palette`` (k-means quantization), ``spaces`` (equalization and
desaturation in Lab/HSV). Every name is here as ``volnorm.color.<name>``.
"""

from __future__ import annotations

from volnorm.color.colormaps import (
    apply_colormap,
    colormap_table,
    invert_colormap,
    quantize_grey,
)
from volnorm.color.grey import LUMA, PERCEIVED, exposure, to_grey
from volnorm.color.palette import fit_quantize, nearest, pixels_sample, quantize
from volnorm.color.spaces import desaturate, equalize_color, radial_weight

__all__ = [
    "LUMA", "PERCEIVED", "apply_colormap", "colormap_table", "desaturate", "equalize_color", "exposure", "fit_quantize", "invert_colormap",
    "quantize", "quantize_grey", "radial_weight", "to_grey",
]

# the earlier private spellings (tests, benchmarks)
_pixels_sample = pixels_sample
_nearest = nearest
