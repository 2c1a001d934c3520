"""The manifest of a volnorm store: what marks a Zarr group as volnorm's, and as complete.

A store's root ``zarr.json`` carries ``attributes["volnorm"]``, the manifest, with
``format`` (:data:`FORMAT`) and ``complete: true`` written last
(:meth:`volnorm.io.store.Staging.commit`). Reading it needs nothing else of volnorm,
so both the commit protocol (:mod:`volnorm.io.store`) and the checks
(:mod:`volnorm.integrity`) build on this module, and it imports neither.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FORMAT = "volnorm-store"
FORMAT_VERSION = 1


class IncompleteStoreError(OSError):
    """A store lacks volnorm's completion marker (interrupted or still being written)."""


def read_attributes(path: str | os.PathLike | Any) -> dict | None:
    """The attributes in a zarr v3 node's ``zarr.json``, or None when there is none (or they
    are not a JSON object); metadata nested too deeply (damaged or hostile) is a ValueError.

    >>> import tempfile
    >>> read_attributes(tempfile.mkdtemp()) is None
    True
    """
    meta = (path if hasattr(path, "zarr_store") else Path(path)) / "zarr.json"  # a local path or a Remote (URL)
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    except RecursionError:
        raise ValueError(f"{meta}: the metadata are nested too deeply to be a volnorm store's (damaged or hostile)") from None
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else {}
    return attrs if isinstance(attrs, dict) else None


def read_manifest(path: str | os.PathLike | Any) -> dict | None:
    """The volnorm manifest of a store, or None when it has none (not volnorm's)."""
    attrs = read_attributes(path)
    if attrs is None:
        return None
    m = attrs.get("volnorm")
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def is_complete(path: str | os.PathLike | Any) -> bool:
    m = read_manifest(path)
    return bool(m and m.get("complete") is True)
