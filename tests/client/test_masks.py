"""NIfTI masks read without nibabel's per-file overhead give exactly what nibabel gives:
the plain single-file NIfTI-1 case read directly (both byte orders, gzipped or not, 2D and
3D), every other file (scaled, NIfTI-2, a header/image pair, cut short) through
``nibabel.load``."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from client.data import masks as masks_module
from client.data.masks import read_nifti


def _nib(path):
    return np.asarray(nib.load(path).dataobj)


def _assert_nibabels(path):
    ours, theirs = read_nifti(path), _nib(path)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


def _no_nibabel_load(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("went through nibabel.load")
    monkeypatch.setattr(nib, "load", boom)


@pytest.mark.parametrize("name", ["m.nii.gz", "m.nii"])
@pytest.mark.parametrize("dtype,shape,order", [
    (np.uint8, (7, 5, 3), "<"), (np.int16, (6, 4), "<"), (np.float32, (5, 4, 2), ">"),
    (np.int32, (3, 8, 1), ">")])
def test_plain_nifti1_is_read_directly_as_nibabel_reads_it(tmp_path, name, dtype, shape,
                                                           order):
    rng = np.random.default_rng(0)
    data = (rng.random(shape) * 50 - 10).astype(dtype)          # x-major, asymmetric
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_data_dtype(np.dtype(dtype).newbyteorder(order))
    path = tmp_path / name
    nib.save(image, path)
    expected = _nib(path)
    assert masks_module._plain_nifti1(path, nib) is not None       # the direct path
    _assert_nibabels(path)
    monkeypatch = pytest.MonkeyPatch()
    try:
        _no_nibabel_load(monkeypatch)
        np.testing.assert_array_equal(read_nifti(path), expected)
    finally:
        monkeypatch.undo()


def test_scaled_nifti2_and_pairs_go_through_nibabel(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(4, 3, 2) - 5
    scaled = nib.Nifti1Image(data, np.eye(4))
    scaled.header.set_slope_inter(0.5, -2.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    nib.save(nib.Nifti2Image(data, np.eye(4)), tmp_path / "two.nii")
    nib.save(nib.Nifti1Pair(data, np.eye(4)), tmp_path / "pair.img")
    for path in (tmp_path / "scaled.nii.gz", tmp_path / "two.nii", tmp_path / "pair.img"):
        assert masks_module._plain_nifti1(path, nib) is None
        _assert_nibabels(path)
    assert read_nifti(tmp_path / "scaled.nii.gz").dtype != np.int16     # scaled by nibabel


def test_a_cut_or_broken_file_raises_as_nibabel_does(tmp_path):
    data = np.ones((8, 8, 2), dtype=np.uint8)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "whole.nii")
    raw = (tmp_path / "whole.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:-10])
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"not a nifti file at all"))
    (tmp_path / "junk2.nii.gz").write_bytes(b"not even gzip")
    negative = bytearray(raw)                    # dim[1] = -1 (int16 at byte 42)
    negative[42:44] = np.array([-1], "<i2").tobytes()      # nibabel writes little-endian
    (tmp_path / "negative.nii").write_bytes(bytes(negative))
    for name in ("cut.nii", "junk.nii.gz", "junk2.nii.gz", "negative.nii"):
        path = tmp_path / name
        assert masks_module._plain_nifti1(path, nib) is None
        with pytest.raises(Exception):
            _nib(path)
        with pytest.raises(Exception):
            read_nifti(path)
