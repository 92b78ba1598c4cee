"""A NIfTI or NRRD research export read through manifest.csv: volumes land on a 3D layout's
grid in the same orientation as the DICOM path (whichever way the file stores its axes); the brain
reader takes the same volumes; labels join by study id; ids become pseudonyms; a manifest
that points outside the site, names an unknown channel or needs DICOM headers is refused
before any file is read; the site cache serves it like a DICOM site."""

from __future__ import annotations

import dataclasses
from functools import partial

import nibabel as nib
import numpy as np
import pytest

from client.data.cache import SiteCache
from client.data.grid import LPS_TO_RAS, to_grid
from client.data.intensity import hu_windows
from client.data.layout import load_layout
from client.data.layout_site import read_site
from client.data.manifest_site import KJI_TO_IJK
from client.data.pseudonyms import pseudonym
from client.data.site import SiteDataError
from client.data.volume import Volume
from client.data.volume_site import GRID_AXCODES
from tests.conftest import CLASSES

KEY = b"manifest-tests-key".ljust(32, b".")
SHAPE = (6, 8, 10)                                    # [Z, Y, X]
# LPS affine of (k, j, i): an oblique-free axial volume, 4 x 3 x 2 mm, offset origin
LPS = np.array([[0, 0, 2.0, -9], [0, 3.0, 0, 4], [4.0, 0, 0, 20], [0, 0, 0, 1]])


def volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1000, 1500, SHAPE).astype(np.float32)


def write_nifti(path, array: np.ndarray, *, flip_x: bool = False, lps=LPS) -> None:
    """``array`` [Z, Y, X] with affine LPS as NIfTI (data [i, j, k], RAS affine); with
    ``flip_x`` the file stores the i axis reversed (and its affine says so)."""
    data = array.transpose(2, 1, 0)
    ras = LPS_TO_RAS @ lps @ KJI_TO_IJK
    if flip_x:
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
        data, ras = data[::-1], ras @ flip
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), ras), path)


@pytest.fixture
def site(tmp_path):
    """Three studies: T1 and T2 volumes (one file stored x-reversed); labels by study id."""
    root = tmp_path / "site"
    rows = ["study_id,channel,file,patient_id"]
    for n, study in enumerate(["RESEARCH-0001", "RESEARCH-0002", "RESEARCH-0003"]):
        for c, channel in enumerate(["T1", "T2"]):
            name = f"nifti/{study}_{channel}.nii.gz"
            write_nifti(root / name, volume(10 * n + c), flip_x=(n, c) == (1, 0))
            rows.append(f"{study},{channel},{name},MRN{n:06d}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "labels.csv").write_text("study_instance_uid,label\nRESEARCH-0001,cyst\n"
                                     "RESEARCH-0002,low_grade_glioma\n")
    return root


def grid_layout(channel_names=("T1", "T2")):
    """ct_volume's windows over the test volume's own grid, channels named T1/T2."""
    ct = load_layout("ct_volume")
    channels = tuple(dataclasses.replace(ct.channels[0], name=name, required=True)
                     for name in channel_names)
    return dataclasses.replace(ct, channels=channels, size=SHAPE, spacing=(4.0, 3.0, 2.0))


def test_volumes_land_on_the_grid_as_dicom_volumes_do_whatever_the_storage_order(site):
    layout = grid_layout()
    data = read_site(site, layout, CLASSES, key=KEY)
    by_key = {s.key: s for s in data.studies}
    windows = [(w.center, w.width) for w in layout.channels[0].intensity.windows]
    for n in range(3):
        study = by_key[pseudonym("study", f"RESEARCH-000{n + 1}", KEY)]
        for c, channel in enumerate(["T1", "T2"]):
            truth = Volume(volume(10 * n + c), (4.0, 3.0, 2.0), LPS, "CT", "", "", "", "")
            grid = np.asarray(to_grid(truth, layout.spacing, layout.size, GRID_AXCODES)[0])
            want = hu_windows(grid, windows)
            for w, window in enumerate(layout.channels[0].intensity.windows):
                np.testing.assert_allclose(study.images[f"{channel}:{window.name}"], want[w],
                                           atol=1e-5)
    labels = {s.key: s.label for s in data.studies}
    assert labels[pseudonym("study", "RESEARCH-0001", KEY)] == CLASSES.index("cyst")
    assert labels[pseudonym("study", "RESEARCH-0003", KEY)] == -1
    assert data.report.files == 6 and data.report.images == 6


def test_the_brain_reader_takes_the_volumes_as_they_are_and_ids_stay_inside(site):
    from client.data.dataset import StudyDataset

    data = read_site(site, None, CLASSES, key=KEY)
    study = next(s for s in data.studies if s.key == pseudonym("study", "RESEARCH-0003", KEY))
    np.testing.assert_array_equal(study.images["T1"], volume(20))
    np.testing.assert_array_equal(study.images["T2"], volume(21))
    assert study.patient_key == pseudonym("patient", "MRN000002", KEY)
    assert data.report.studies_missing["FLAIR"] == 3
    text = repr([(s.key, s.patient_key, list(s.images), s.report) for s in data.studies])
    assert "RESEARCH" not in text and "MRN" not in text and "nii" not in text
    assert len(StudyDataset(data.studies, 16)) == 3


def test_files_decode_in_worker_processes_with_the_same_result(site, monkeypatch):
    """1 and 2 decode workers give the same studies, arrays (bits) and counts; an
    unreadable file and a duplicate row are counted the same way, and a row after an
    unreadable one for the same channel is used (as a one-by-one read would)."""
    from client.data import manifest_site
    from client.data.workers import SharedWorkers

    (site / "nifti" / "broken.nii.gz").write_bytes(b"not a nifti file")
    with open(site / "manifest.csv", "a") as f:
        f.write("RESEARCH-0004,T1,nifti/broken.nii.gz,MRN000004\n"
                "RESEARCH-0004,T1,nifti/RESEARCH-0001_T1.nii.gz,MRN000004\n"
                "RESEARCH-0001,T2,nifti/RESEARCH-0002_T2.nii.gz,MRN000000\n")
    chunks, spawned = [], []
    real_chunk, real_start = manifest_site._read_chunk, SharedWorkers._start

    def chunk(files, layout):
        chunks.append(len(files))
        return real_chunk(files, layout)

    def start(self):
        spawned.append(self.workers)
        real_start(self)
    monkeypatch.setattr(manifest_site, "_read_chunk", chunk)
    one = read_site(site, None, CLASSES, key=KEY, workers=1)
    assert chunks == [9] and spawned == []                 # all in this process
    monkeypatch.setattr(manifest_site, "_read_chunk", real_chunk)   # workers import the real
    monkeypatch.setattr(SharedWorkers, "_start", start)
    two = read_site(site, None, CLASSES, key=KEY, workers=2)
    assert spawned == [2]                       # read in two processes: this one, a helper
    assert one.report.as_dict() == two.report.as_dict()
    assert one.report.skipped["unreadable"] == 1
    assert one.report.skipped["duplicate_channel"] == 1 and one.report.files == 9
    assert [s.key for s in one.studies] == [s.key for s in two.studies]
    assert len(one.studies) == 4                           # RESEARCH-0004 from its second row
    for a, b in zip(one.studies, two.studies):
        assert a.patient_key == b.patient_key and list(a.images) == list(b.images)
        for name in a.images:
            assert a.images[name].dtype == b.images[name].dtype
            np.testing.assert_array_equal(a.images[name], b.images[name])
    by_key = {s.key: s for s in one.studies}
    np.testing.assert_array_equal(by_key[pseudonym("study", "RESEARCH-0004", KEY)].images["T1"],
                                  volume(0))


@pytest.mark.parametrize("attack", ["dotdot", "absolute", "symlink", "channel", "xray_layout"])
def test_a_bad_manifest_is_refused_before_any_file_is_read(site, tmp_path, monkeypatch, attack):
    outside = tmp_path / "elsewhere" / "DOE_JOHN.nii.gz"
    write_nifti(outside, volume(99))
    manifest = site / "manifest.csv"
    layout = None
    if attack == "dotdot":
        row = "RESEARCH-0009,T1,../elsewhere/DOE_JOHN.nii.gz"
    elif attack == "absolute":
        row = f"RESEARCH-0009,T1,{outside}"
    elif attack == "symlink":
        (site / "nifti" / "link.nii.gz").symlink_to(outside)
        row = "RESEARCH-0009,T1,nifti/link.nii.gz"
    elif attack == "channel":
        row = "RESEARCH-0009,DOE_JOHN,nifti/RESEARCH-0001_T1.nii.gz"
    else:
        row, layout = "RESEARCH-0009,frontal,nifti/RESEARCH-0001_T1.nii.gz", \
            load_layout("chest_xray")
    manifest.write_text(manifest.read_text() + row + ",\n")

    def never(*args, **kwargs):
        raise AssertionError("a file was read before the manifest was checked")
    monkeypatch.setattr(nib, "load", never)
    with pytest.raises(SiteDataError, match="manifest.csv") as err:
        read_site(site, layout, CLASSES, key=KEY, cache=SiteCache(tmp_path / "cache"))
    assert "DOE" not in str(err.value) and "elsewhere" not in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_the_site_cache_serves_a_manifest_site_and_sees_a_changed_file(site, tmp_path):
    cache = SiteCache(tmp_path / "cache")
    fresh = read_site(site, None, CLASSES, key=KEY)
    read_site(site, None, CLASSES, key=KEY, cache=cache)
    cached = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "hit"
    assert [s.key for s in cached.studies] == [s.key for s in fresh.studies]
    for a, b in zip(fresh.studies, cached.studies):
        assert all(np.array_equal(a.images[k], b.images[k]) for k in a.images)
    write_nifti(site / "nifti" / "RESEARCH-0002_T2.nii.gz", volume(77))
    changed = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "miss" and cache.changed_files == 1
    study = next(s for s in changed.studies if s.key == pseudonym("study", "RESEARCH-0002", KEY))
    np.testing.assert_array_equal(study.images["T2"], volume(77))


def write_nrrd(path, array: np.ndarray, *, space: str, flip_x: bool = False,
               lps=LPS) -> None:
    """``array`` [Z, Y, X] with affine LPS as NRRD (data [i, j, k]; ``space directions`` one
    row per axis) in ``space`` (LPS as 3D Slicer writes it, or RAS); with ``flip_x`` the file
    stores the i axis reversed and its direction and origin say so."""
    import nrrd

    data = array.transpose(2, 1, 0)
    affine = lps @ KJI_TO_IJK                              # (i, j, k, 1) -> LPS
    if space == "right-anterior-superior":
        affine = LPS_TO_RAS @ affine
    if flip_x:
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
        data, affine = data[::-1], affine @ flip
    path.parent.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(path), np.ascontiguousarray(data), {
        "space": space, "space directions": affine[:3, :3].T,
        "space origin": affine[:3, 3]}, index_order="F")


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior"])
def test_nrrd_files_land_on_the_grid_as_the_same_volumes_in_nifti(site, tmp_path, space):
    """The fixture's studies again, every file NRRD (one stored x-reversed): what the layout
    reads is what it reads from the NIfTI files. An NRRD without a patient space is skipped
    with its reason, not guessed."""
    import nrrd

    root = tmp_path / "nrrd-site"
    rows = ["study_id,channel,file,patient_id"]
    for n, study in enumerate(["RESEARCH-0001", "RESEARCH-0002", "RESEARCH-0003"]):
        for c, channel in enumerate(["T1", "T2"]):
            name = f"nrrd/{study}_{channel}.nrrd"
            write_nrrd(root / name, volume(10 * n + c), space=space, flip_x=(n, c) == (0, 1))
            rows.append(f"{study},{channel},{name},MRN{n:06d}")
    nrrd.write(str(root / "nrrd" / "scanner.nrrd"), volume(99).transpose(2, 1, 0),
               {"space": "scanner-xyz", "space directions": np.eye(3)}, index_order="F")
    rows.append("RESEARCH-0004,T1,nrrd/scanner.nrrd,MRN000004")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "labels.csv").write_text((site / "labels.csv").read_text())
    layout = grid_layout()
    from_nrrd = read_site(root, layout, CLASSES, key=KEY)
    from_nifti = {s.key: s for s in read_site(site, layout, CLASSES, key=KEY).studies}
    assert from_nrrd.report.skipped["unsupported_space"] == 1
    assert {s.key for s in from_nrrd.studies} == set(from_nifti)
    for study in from_nrrd.studies:
        assert study.images.keys() == from_nifti[study.key].images.keys()
        for name, image in study.images.items():
            np.testing.assert_allclose(image, from_nifti[study.key].images[name], atol=1e-5)


def test_an_oblique_nrrd_volume_is_placed_as_the_same_oblique_nifti(tmp_path):
    """Tilted 25 degrees about the head-foot axis: the direction vectors are the rows of
    ``space directions``, not its columns (a transposed reading puts the voxels elsewhere)."""
    c, s = np.cos(np.radians(25)), np.sin(np.radians(25))
    rotation = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    oblique = rotation @ LPS
    sites = {}
    for kind in ("nifti", "nrrd"):
        root = tmp_path / kind
        name = f"{kind}/study.{'nii.gz' if kind == 'nifti' else 'nrrd'}"
        rows = ["study_id,channel,file"]
        for channel in ("T1", "T2"):
            file = name.replace("study", f"study_{channel}")
            writer = write_nifti if kind == "nifti" else partial(
                write_nrrd, space="left-posterior-superior")
            writer(root / file, volume(7), lps=oblique)
            rows.append(f"RESEARCH-0001,{channel},{file}")
        (root / "manifest.csv").write_text("\n".join(rows) + "\n")
        (root / "labels.csv").write_text("study_instance_uid,label\nRESEARCH-0001,cyst\n")
        sites[kind] = read_site(root, grid_layout(), CLASSES, key=KEY).studies[0].images
    assert sites["nrrd"].keys() == sites["nifti"].keys()
    for name, image in sites["nifti"].items():
        assert np.abs(image).max() > 0                    # the volume is on the grid
        np.testing.assert_allclose(sites["nrrd"][name], image, atol=1e-5)


def test_hostile_headers_are_skipped_before_any_voxel_is_read(tmp_path, monkeypatch):
    """An export written by someone else: a NIfTI and an NRRD header claiming 4096^3 voxels
    (256 GiB as float32) over a few bytes of data are skipped as too_large without decoding;
    an NRRD whose voxels live in a detached file outside the site is never followed."""
    import nrrd

    root = tmp_path / "hostile"
    outside = tmp_path / "outside.raw"
    outside.write_bytes(np.arange(480, dtype=np.float32).tobytes())
    write_nifti(root / "f/ok_T1.nii", volume(1))
    write_nifti(root / "f/ok_T2.nii", volume(2))
    raw = bytearray((root / "f/ok_T1.nii").read_bytes())
    raw[42:48] = np.array([4096, 4096, 4096], "<i2").tobytes()   # dim[1..3] of the header
    (root / "f/huge.nii").write_bytes(bytes(raw))
    nrrd.write(str(root / "f/huge.nrrd"), volume(3).transpose(2, 1, 0), {
        "space": "left-posterior-superior", "space directions": np.eye(3)}, index_order="F")
    text = (root / "f/huge.nrrd").read_bytes()
    (root / "f/huge.nrrd").write_bytes(text.replace(b"sizes: 10 8 6", b"sizes: 4096 4096 4096"))
    (root / "f/detached.nrrd").write_text(
        "NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\n"
        "sizes: 10 8 6\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nendian: little\n"
        f"encoding: raw\ndata file: {outside}\n\n")
    rows = ["study_id,channel,file", "S1,T1,f/ok_T1.nii", "S1,T2,f/ok_T2.nii",
            "S2,T1,f/huge.nii", "S3,T1,f/huge.nrrd", "S4,T1,f/detached.nrrd"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "labels.csv").write_text("study_instance_uid,label\nS1,cyst\n")

    followed = []
    real_open = open

    def watch(file, *args, **kwargs):
        if str(file) == str(outside):
            followed.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watch)
    data = read_site(root, grid_layout(), CLASSES, key=KEY)
    assert data.report.skipped["too_large"] == 2
    assert data.report.skipped["unsupported_space"] == 1 and not followed
    assert [s.key for s in data.studies] == [pseudonym("study", "S1", KEY)]
