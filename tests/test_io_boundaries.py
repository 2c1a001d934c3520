"""The I/O layer's boundaries: one ``open_mask`` rule for every caller, and imports that run one way."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import xarray as xr

import volnorm as vn
from volnorm.io.readers import open_mask
from volnorm.testing import raise_if_dask_computes

SHAPE = (6, 5, 4)  # NIfTI order (i, j, k): dims (z, y, x) = (4, 5, 6)


def write(path: Path, data: np.ndarray, *, slope: float | None = None, inter: float | None = None) -> Path:
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return path


def volume(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, size=shape).astype(np.int16)


@pytest.fixture
def stack(tmp_path) -> xr.DataArray:
    """Three data volumes of one grid, as ``open_nifti`` gives them."""
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        write(folder / f"sub-{i}.nii.gz", volume(10 + i).astype(np.float32))
    return vn.open_nifti(folder)


# ---------------------------------------------------------------------------
# open_mask
# ---------------------------------------------------------------------------


def test_one_file_broadcasts_to_every_volume(tmp_path, stack):
    raw = volume(1)
    p = write(tmp_path / "brain.nii.gz", raw)
    with raise_if_dask_computes():
        mask = open_mask(p, like=stack)
        masked = stack.where(mask)
    assert mask.dims == ("z", "y", "x") and mask.dtype == bool and mask.name == "mask"
    assert isinstance(mask.data, da.Array)
    assert list(mask.coords) == []
    np.testing.assert_array_equal(mask.attrs["affine"], nib.load(p).affine)
    np.testing.assert_array_equal(mask.values, raw.T != 0)
    assert masked.sizes == stack.sizes
    np.testing.assert_array_equal(np.isnan(masked.values), np.broadcast_to(raw.T == 0, stack.shape))


def test_one_file_without_like(tmp_path):
    p = write(tmp_path / "brain.nii", volume(2))
    mask = open_mask(p)
    assert mask.dims == ("z", "y", "x") and isinstance(mask.data, da.Array)


def test_one_mask_per_volume_takes_the_datas_volume_coordinate(tmp_path, stack):
    folder = tmp_path / "masks"
    folder.mkdir()
    raws = [volume(20 + i) for i in range(3)]
    for i, raw in enumerate(raws):
        write(folder / f"mask-{i}.nii.gz", raw)
    with raise_if_dask_computes():
        mask = open_mask(folder, like=stack)
        masked = stack.where(mask)
    assert mask.dims == ("volume", "z", "y", "x") and isinstance(mask.data, da.Array)
    assert list(mask.coords) == ["volume"]
    assert list(mask["volume"].values) == list(stack["volume"].values)
    for i, raw in enumerate(raws):
        np.testing.assert_array_equal(mask.values[i], raw.T != 0)
    # aligned, not intersected: the mask files' own names are gone
    assert masked.sizes == stack.sizes
    np.testing.assert_array_equal(np.isnan(masked.values), np.stack([r.T == 0 for r in raws]))


def test_a_count_of_masks_that_is_not_the_datas_is_refused(tmp_path, stack):
    folder = tmp_path / "masks"
    folder.mkdir()
    for i in range(2):
        write(folder / f"mask-{i}.nii", volume(i))
    with pytest.raises(ValueError, match=re.escape(str(folder)) + r": 2 mask files but the data has 3 volumes"):
        open_mask(folder, like=stack)
    with pytest.raises(ValueError, match=re.escape(str(folder)) + r": 2 mask files .* need `like=`"):
        open_mask(folder)


def test_a_grid_that_is_not_the_datas_is_refused(tmp_path, stack):
    p = write(tmp_path / "other.nii.gz", volume(3, shape=(6, 5, 7)))
    msg = (
        re.escape(str(p)) + r": the mask's grid \{'z': 7, 'y': 5, 'x': 6\} "
        r"is not the data's \{'z': 4, 'y': 5, 'x': 6\}"
    )
    with pytest.raises(ValueError, match=msg):
        open_mask(p, like=stack)


def test_the_stored_values_decide_not_the_scaled_ones(tmp_path, stack):
    raw = volume(4)
    p = write(tmp_path / "scaled.nii", raw, slope=2.0, inter=1.0)  # raw 0 reads as 1.0 once scaled
    assert (np.asarray(nib.load(p).dataobj) != 0).all()
    np.testing.assert_array_equal(open_mask(p, like=stack).values, raw.T != 0)


def test_4d_masks_keep_t_as_part_of_the_grid(tmp_path, stack):
    one_frame = write(tmp_path / "one.nii", volume(5, shape=(*SHAPE, 1)))
    assert open_mask(one_frame, like=stack).dims == ("z", "y", "x")
    frames = write(tmp_path / "frames.nii", volume(6, shape=(*SHAPE, 3)))
    with pytest.raises(ValueError, match=r"frames\.nii: the mask's grid \{'t': 3, "):
        open_mask(frames, like=stack)
    data_4d = vn.open_nifti(write(tmp_path / "bold.nii", volume(7, shape=(*SHAPE, 3)).astype(np.float32)))
    assert open_mask(frames, like=data_4d).dims == ("t", "z", "y", "x")
    assert open_mask(tmp_path / "one.nii", like=data_4d).dims == ("z", "y", "x")  # broadcasts over t


def test_like_must_be_a_dataarray(tmp_path):
    p = write(tmp_path / "m.nii", volume(8))
    with pytest.raises(TypeError, match="`like` must be an xarray.DataArray.*got ndarray"):
        open_mask(p, like=np.zeros((4, 5, 6)))


def test_nibabel_files_as_masks():
    files = vn.datasets.nibabel_files()
    data = vn.open_nifti(files["functional.nii"])  # (volume 1, t 20, z 3, y 21, x 17)
    mask = open_mask(files["resampled_anat_moved.nii"], like=data)  # (3, 21, 17): its grid
    assert mask.dims == ("z", "y", "x")
    ref = np.asarray(nib.load(files["resampled_anat_moved.nii"]).dataobj).T != 0
    np.testing.assert_array_equal(mask.values, ref)
    with pytest.raises(ValueError, match=r"anatomical\.nii: the mask's grid"):
        open_mask(files["anatomical.nii"], like=data)


# ---------------------------------------------------------------------------
# imports run one way
# ---------------------------------------------------------------------------

ROOT = Path(vn.__file__).parent
IO_LAYER = ["io/gzipstream.py", "io/manifest.py", "integrity.py", "io/store.py", "io/nifti.py", "io/niftizarr.py", "io/readers.py", "info.py"]


def _volnorm_imports(path: Path) -> tuple[set[str], list[str], list[str]]:
    """(modules imported at module level, imports inside functions, private names imported)."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    inner: list[str] = []
    private: list[str] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("volnorm")):
            continue
        private += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        if node in tree.body:
            top.add(node.module)
        else:
            inner.append(node.module)
    return top, inner, private


@pytest.mark.parametrize("rel", IO_LAYER)
def test_io_layer_imports_at_the_top_and_no_private_name(rel):
    top, inner, private = _volnorm_imports(ROOT / rel)
    assert not inner, f"{rel}: volnorm imported inside a function: {inner}"
    assert not private, f"{rel}: private names of other modules: {private}"


def test_io_layer_imports_run_one_way():
    """Each module imports only the ones listed before it (and modules outside this layer)."""
    names = [f"volnorm.{r[:-3].replace('/', '.')}" for r in IO_LAYER]
    for i, rel in enumerate(IO_LAYER):
        top, _, _ = _volnorm_imports(ROOT / rel)
        later = top & set(names[i:])
        assert not later, f"{rel} imports {sorted(later)}, which sit above it"
