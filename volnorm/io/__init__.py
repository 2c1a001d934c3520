"""Readers and writers: NIfTI, image files and volnorm's Zarr stores."""

from __future__ import annotations
