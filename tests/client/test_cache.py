"""The site cache: what it serves equals a fresh decode (brain, chest, CT layouts); a change
of files, layout or key invalidates it and a change of labels does not; a crashed or corrupt
write is never served; old caches are removed; nothing in it names a patient."""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import shutil
import stat

import numpy as np
import pydicom
import pytest

from client.data import cache as cache_module
from client.data import cache_files
from client.data import layout_site
from client.data import site as site_module
from client.data.cache import INDEX, SiteCache
from client.data.cache_files import UnitMaps
from client.data.layout import load_layout
from client.data.layout_site import read_site
from tests.conftest import CLASSES, phi_strings

KEY = b"cache-tests-key".ljust(32, b".")


@pytest.fixture
def site(tiny_sites, tmp_path):
    """A private copy of a small brain site (the tests edit its files)."""
    return shutil.copytree(tiny_sites / "site-0", tmp_path / "site-0")


def assert_same(fresh, cached):
    """Two reads of a site are the same data: studies, arrays (dtype and bits), labels,
    splits, reports, masks, counts and fingerprint."""
    assert [s.key for s in cached.studies] == [s.key for s in fresh.studies]
    for a, b in zip(fresh.studies, cached.studies):
        assert (a.patient_key, a.label, a.split, a.report) == (b.patient_key, b.label, b.split,
                                                               b.report)
        assert list(a.images) == list(b.images)
        for name in a.images:
            assert a.images[name].dtype == b.images[name].dtype
            np.testing.assert_array_equal(a.images[name], b.images[name])
        assert (a.mask is None) == (b.mask is None)
        if a.mask is not None:
            assert a.mask.dtype == b.mask.dtype
            np.testing.assert_array_equal(a.mask, b.mask)
    assert cached.report.as_dict() == fresh.report.as_dict()
    assert cached.fingerprint == fresh.fingerprint


def boom(*args, **kwargs):
    raise AssertionError("decoded although the cache was current")


def no_decoding(monkeypatch):
    """Make any decode fail: a read that still works came from the cache."""
    monkeypatch.setattr(layout_site, "decode_site", boom)
    monkeypatch.setattr(layout_site, "decode_layout_site", boom)


def test_brain_cache_equals_fresh_decode_and_is_mapped(site, tmp_path, monkeypatch):
    fresh = read_site(site, None, CLASSES, key=KEY)
    cache = SiteCache(tmp_path / "cache")
    first = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "miss"
    assert_same(fresh, first)
    no_decoding(monkeypatch)
    monkeypatch.setattr(site_module, "_read_masks", boom)      # the masks come cached too
    second = read_site(site, None, CLASSES, key=KEY, cache=SiteCache(tmp_path / "cache"))
    assert_same(fresh, second)
    assert sum(s.mask is not None for s in second.studies) > 0
    image = next(iter(second.studies[0].images.values()))
    assert _mapped(image) and not image.flags.writeable                  # mapped, read-only


def _mapped(array) -> bool:
    """Whether ``array``'s memory is a file map (an ``mmap`` down its chain of bases)."""
    while array is not None and not isinstance(array, mmap.mmap):
        array = array.obj if isinstance(array, memoryview) else getattr(array, "base", None)
    return array is not None


def test_chest_layout_cache_equals_fresh_decode(tmp_path, monkeypatch):
    from medfed.synth.chest import CLASS_NAMES, synthesize_chest

    synthesize_chest(tmp_path / "data", n_sites=1, seed=5, patients=8)
    chest, folder = load_layout("chest_xray"), tmp_path / "data" / "site-0"
    fresh = read_site(folder, chest, CLASS_NAMES, key=KEY)
    assert read_site(folder, chest, CLASS_NAMES, key=KEY,
                     cache=SiteCache(tmp_path / "cache")).studies
    no_decoding(monkeypatch)
    assert_same(fresh, read_site(folder, chest, CLASS_NAMES, key=KEY,
                                 cache=SiteCache(tmp_path / "cache")))


def test_ct_volume_cache_equals_fresh_decode(tmp_path, monkeypatch):
    from medfed.synth.ct import CLASS_NAMES, synthesize_ct

    synthesize_ct(tmp_path / "data", n_sites=1, seed=3, patients=4)
    ct = dataclasses.replace(load_layout("ct_volume"), size=(16, 16, 16), spacing=(8.0, 8.0, 8.0))
    folder = tmp_path / "data" / "site-0"
    fresh = read_site(folder, ct, CLASS_NAMES, key=KEY)
    assert read_site(folder, ct, CLASS_NAMES, key=KEY, cache=SiteCache(tmp_path / "cache")).studies
    no_decoding(monkeypatch)
    cached = read_site(folder, ct, CLASS_NAMES, key=KEY, cache=SiteCache(tmp_path / "cache"))
    assert_same(fresh, cached)
    assert next(iter(cached.studies[0].images.values())).shape == (16, 16, 16)
    # 3D prepared rows (volumes resized to the model's cube) equal the in-memory ones
    import torch

    from client.data.dataset import StudyDataset
    from client.data.layout_site import dataset_options

    options = dataset_options(ct)
    memory = StudyDataset(fresh.studies, 8, **options)
    (tmp_path / "store").mkdir()
    disk = StudyDataset(cached.studies, 8, store=tmp_path / "store", **options)
    assert disk.rows is not None and disk.image(0).shape == (len(ct.input_channels), 8, 8, 8)
    assert all(torch.equal(memory.image(i), disk.image(i)) for i in range(len(memory)))


def test_changed_file_layout_or_key_invalidates_changed_labels_do_not(site, tmp_path):
    cache = SiteCache(tmp_path / "cache", keep=10)
    read_site(site, None, CLASSES, key=KEY, cache=cache)
    # labels.csv is joined afresh: editing it is served from the cache, with the new labels
    labels = site / "labels.csv"
    rows = labels.read_text().splitlines()
    labels.write_text("\n".join(rows[:1] + rows[2:]) + "\n")        # one study unlabelled
    relabelled = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "hit"
    assert_same(read_site(site, None, CLASSES, key=KEY), relabelled)
    # a mask dropped from segmentations.csv: the images stay cached, the masks are re-read
    [side] = cache.current.glob("masks-*")
    segmentations = site / "segmentations.csv"
    rows = segmentations.read_text().splitlines()
    segmentations.write_text("\n".join(rows[:-1]) + "\n")
    remasked = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "hit"
    assert [p.name for p in cache.current.glob("masks-*")] not in ([], [side.name])
    assert_same(read_site(site, None, CLASSES, key=KEY), remasked)
    # one DICOM file rewritten with other pixels: decoded again, the new pixels served
    path = next(p for p in sorted((site / "dicom").rglob("*.dcm"))
                if "PixelData" in pydicom.dcmread(p, stop_before_pixels=False))
    ds = pydicom.dcmread(path)
    ds.PixelData = (ds.pixel_array // 2).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(path)
    changed = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "miss" and cache.changed_files == 1
    assert_same(read_site(site, None, CLASSES, key=KEY), changed)
    # another key (pseudonyms differ) and another layout each get their own cache
    read_site(site, None, CLASSES, key=b"another-key".ljust(32, b"."), cache=cache)
    assert cache.last == "miss"
    files = cache.manifest(site / "dicom", KEY)
    brain = cache.fingerprint(files, None, KEY)
    assert cache.fingerprint(files, load_layout("chest_xray"), KEY) != brain
    assert cache.fingerprint(files, None, None) != brain


def _study_files(folder) -> dict[str, list]:
    """The site's DICOM files by StudyInstanceUID (read here, before any counting)."""
    out: dict[str, list] = {}
    for path in sorted(folder.rglob("*")):
        try:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        except Exception:  # noqa: BLE001 - junk files
            continue
        out.setdefault(uid, []).append(path)
    return out


def count_reads(monkeypatch) -> list:
    """Every ``pydicom.dcmread`` from now on (the readers and the cache call it through the
    module), as the list of paths read."""
    reads, real = [], pydicom.dcmread

    def counted(path, *args, **kwargs):
        reads.append(os.path.realpath(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(pydicom, "dcmread", counted)
    return reads


def test_one_changed_file_re_reads_only_its_study(site, tmp_path, monkeypatch):
    """Counted: after one file of one study changes, the only DICOM files read are that
    study's, each once (the changed file's one read places it in its study and decodes it:
    no header pass apart); every other study is served from its unit, and the result
    equals a fresh decode of the changed site."""
    by_study = _study_files(site / "dicom")
    uid, files = max(by_study.items(), key=lambda kv: len(kv[1]))
    assert len(by_study) > 5 and len(files) > 1
    cache = SiteCache(tmp_path / "cache")
    first = read_site(site, None, CLASSES, key=KEY, cache=cache)
    path = next(p for p in files if "PixelData" in pydicom.dcmread(p))
    ds = pydicom.dcmread(path)
    ds.PixelData = (ds.pixel_array // 2).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(path)
    reads = count_reads(monkeypatch)
    changed = read_site(site, None, CLASSES, key=KEY, cache=cache)
    monkeypatch.undo()
    assert cache.last == "miss" and cache.changed_files == 1 and cache.decoded_units == 1
    assert cache.reused_units == len(list((tmp_path / "cache" / "units").iterdir())) - 2
    study = {os.path.realpath(p) for p in files}
    assert set(reads) == study                       # all of its files, nothing else
    assert len(reads) == len(files)                  # one read each, the changed one too
    fresh = read_site(site, None, CLASSES, key=KEY)
    assert_same(fresh, changed)
    moved = [s.key for s, old in zip(changed.studies, first.studies)
             if any(not np.array_equal(s.images[c], old.images[c]) for c in s.images)]
    assert len(moved) == 1                           # the new pixels are served


@pytest.mark.parametrize("how", ["in_place", "renamed"])
def test_a_file_replaced_with_its_size_and_mtime_kept_is_decoded_again(site, tmp_path, how):
    """``cp -p`` (in place) or ``rsync -a`` (a new file renamed over) keeps a replaced
    file's size and mtime; the cache still sees the change (ctime, inode) and serves the new
    pixels, never the old version's."""
    cache = SiteCache(tmp_path / "cache")
    read_site(site, None, CLASSES, key=KEY, cache=cache)
    path = next(p for p in sorted((site / "dicom").rglob("*.dcm"))
                if "PixelData" in pydicom.dcmread(p))
    before = path.stat()
    ds = pydicom.dcmread(path)
    ds.PixelData = (ds.pixel_array // 2).astype(ds.pixel_array.dtype).tobytes()
    target = path if how == "in_place" else path.with_name(".incoming")
    ds.save_as(target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    if how == "renamed":
        os.replace(target, path)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    changed = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "miss" and cache.changed_files == 1 and cache.decoded_units == 1
    assert_same(read_site(site, None, CLASSES, key=KEY), changed)


def test_a_new_view_joining_a_study_re_reads_only_that_study(tmp_path, monkeypatch):
    """Counted, chest layout: a lateral film added to a study that had only its frontal one
    is placed by its header and re-reads that study alone; the study gains the channel."""
    from medfed.synth.chest import CLASS_NAMES, synthesize_chest

    synthesize_chest(tmp_path / "data", n_sites=1, seed=5, patients=10)
    chest, folder = load_layout("chest_xray"), tmp_path / "data" / "site-0"
    by_study = _study_files(folder / "dicom")
    uid, files = next((u, f) for u, f in sorted(by_study.items()) if len(f) == 2)
    lateral = next(p for p in files if pydicom.dcmread(p).ViewPosition == "LL")
    aside = lateral.rename(tmp_path / "aside.dcm")
    cache = SiteCache(tmp_path / "cache")
    before = read_site(folder, chest, CLASS_NAMES, key=KEY, cache=cache)
    aside.rename(lateral)
    reads = count_reads(monkeypatch)
    after = read_site(folder, chest, CLASS_NAMES, key=KEY, cache=cache)
    monkeypatch.undo()
    assert cache.decoded_units == 1 and cache.reused_units > 5
    assert set(reads) == {os.path.realpath(p) for p in files}
    assert_same(read_site(folder, chest, CLASS_NAMES, key=KEY), after)
    gained = [s for s in after.studies if "lateral" in s.images]
    assert len(gained) == sum("lateral" in s.images for s in before.studies) + 1


def test_units_decode_in_worker_processes_with_the_same_result(site, tmp_path):
    cache = SiteCache(tmp_path / "cache")
    parallel = read_site(site, None, CLASSES, key=KEY, workers=2, cache=cache)
    assert cache.last == "miss" and cache.decoded_units >= 4
    assert_same(read_site(site, None, CLASSES, key=KEY), parallel)


def test_each_process_writes_the_units_it_decodes_and_returns_only_their_names(
        site, tmp_path, monkeypatch):
    """The decoded arrays never travel back to the coordinating process (pickled through a
    pipe and written by it alone, they made two workers no faster than one): each unit
    comes back as the path of its written temporary file and its index, and the one pass
    over the files brings back only where each file's arrays were spilled."""
    from client.data.workers import SharedWorkers

    real_imap, returned = SharedWorkers.imap, []

    def recording_imap(self, fn, items):
        for i, value in real_imap(self, fn, items):
            returned.append((self.workers, value))
            yield i, value
    monkeypatch.setattr(SharedWorkers, "imap", recording_imap)
    cache = SiteCache(tmp_path / "cache")
    parallel = read_site(site, None, CLASSES, key=KEY, workers=2, cache=cache)
    monkeypatch.setattr(SharedWorkers, "imap", real_imap)
    units = [v for workers, v in returned if workers == 2 and len(v) == 4]
    assert len(units) == cache.decoded_units >= 4
    assert all(isinstance(temp, str) and isinstance(index, dict) and out is None
               and error is None for temp, index, out, error in units)
    reads = [v for workers, v in returned if workers == 2 and len(v) == 2
             and isinstance(v[1], list)]                   # the one pass over the files
    assert sum(len(files) for _, files in reads) == parallel.report.files
    assert all(isinstance(spill, str) for spill, _ in reads)
    assert all(isinstance(ref[0], int) for _, files in reads for _, _, refs in files
               for ref in refs)                     # (offset, dtype, shape): no array
    assert_same(read_site(site, None, CLASSES, key=KEY), parallel)


def test_a_crashed_write_leaves_nothing_that_is_served(site, tmp_path, monkeypatch):
    """The writer dies after a unit's arrays, before its index (the disk filled up): no
    complete-looking unit or version remains, the reason is kept (type and OS text, not the
    path the OS error names), and the next read decodes and writes a good one."""
    real = cache_files._footer

    def disk_full(head):
        raise OSError(28, "No space left on device", str(site / "secret-patient-folder"))
    monkeypatch.setattr(cache_files, "_footer", disk_full)
    cache = SiteCache(tmp_path / "cache")
    served = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "unwritable"
    assert cache.write_error == "OSError: No space left on device"
    assert "secret" not in cache.describe() and "No space left" in cache.describe()
    assert cache.entries() == []
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]   # no leftovers
    monkeypatch.setattr(cache_files, "_footer", real)
    fresh = read_site(site, None, CLASSES, key=KEY)
    assert_same(fresh, served)
    assert_same(fresh, read_site(site, None, CLASSES, key=KEY, cache=cache))
    assert cache.last == "miss" and len(cache.entries()) == 1


@pytest.mark.parametrize("damage", ["truncate_group", "extend_group", "cut_footer",
                                    "garbage_index", "index_points_outside",
                                    "index_missing_keys", "drop_unit", "garbage_version"])
def test_a_corrupt_cache_is_detected_and_rebuilt(site, tmp_path, damage):
    """A damaged study unit is removed and only that study decoded again; a damaged version
    index is removed and its units, still good, are reused; a damaged unit index is not
    read on a hit (the version keeps a copy) and wrong data is never served."""
    cache = SiteCache(tmp_path / "cache")
    read_site(site, None, CLASSES, key=KEY, cache=cache)
    fresh = read_site(site, None, CLASSES, key=KEY)      # not mapped: the test cuts the file
    units = sorted(p for p in (tmp_path / "cache" / cache_module.UNITS).iterdir()
                   if cache_files.read_unit_index(p, p.name)["groups"])
    assert len(units) == len(fresh.studies)              # one unit per study
    total = len(list((tmp_path / "cache" / cache_module.UNITS).iterdir()))   # + junk files
    folder = group = units[0]                            # one file per unit
    if damage == "truncate_group":
        with open(group, "r+b") as f:
            f.truncate(group.stat().st_size - 4096)
    elif damage == "extend_group":                   # another write's tail
        with open(group, "ab") as f:
            f.write(b"\0" * 4096)
    elif damage == "cut_footer":                     # all arrays there, the end cut short
        with open(group, "r+b") as f:
            f.truncate(group.stat().st_size - 3)
    elif damage == "drop_unit":
        group.unlink()
    elif damage == "garbage_index":          # the unit's own index: a hit reads the copy
        size = group.stat().st_size
        with open(group, "r+b") as f:
            f.seek(size - 16 - 30)          # inside the index, before the footer
            f.write(b"garbage!" * 3)
    elif damage == "garbage_version":
        (cache.entries()[0] / INDEX).write_text('{"format": 2, "finger')
    else:                                    # the version's copy of the unit's index
        version = json.loads((cache.entries()[0] / INDEX).read_text())
        index = next(u["index"] for u in version["units"] if u["name"] == folder.name)
        if damage == "index_missing_keys":
            del index["report"]["files"], index["studies"][0]["key"]
            index["report"]["bogus"] = 1
        else:
            index["studies"][0]["images"] = {k: [0, 10**6]
                                             for k in index["studies"][0]["images"]}
        (cache.entries()[0] / INDEX).write_text(json.dumps(version))
    if damage == "garbage_index":
        assert_same(fresh, read_site(site, None, CLASSES, key=KEY, cache=cache))
        assert cache.last == "hit"
        return
    rebuilt = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "rebuilt"
    assert cache.decoded_units == (0 if damage == "garbage_version" else 1)
    assert cache.reused_units + cache.decoded_units == total
    assert_same(fresh, rebuilt)
    assert_same(fresh, read_site(site, None, CLASSES, key=KEY, cache=cache))
    assert cache.last == "hit"


def test_disk_use_is_bounded_least_recently_used_go_first(site, tmp_path):
    cache = SiteCache(tmp_path / "cache", keep=2)
    dead, busy = tmp_path / "cache" / ".tmp-dead", tmp_path / "cache" / ".tmp-busy"
    for folder in (dead, busy):                 # a crashed writer's leftovers, a live writer's
        folder.mkdir(parents=True)
        (folder / "g000.npy").write_bytes(b"x")
    os.utime(dead, (0, 0))
    keys = [bytes([i]) * 32 for i in range(3)]
    names = []
    for key in keys:
        read_site(site, None, CLASSES, key=key, cache=cache)
        names.append(cache.entries()[-1].name)
    assert [p.name for p in cache.entries()] == names[1:]               # oldest removed
    assert not dead.exists() and busy.exists()
    read_site(site, None, CLASSES, key=keys[1], cache=cache)            # use the older one
    assert cache.last == "hit"
    read_site(site, None, CLASSES, key=keys[0], cache=cache)            # a third: evict keys[2]
    assert {p.name for p in cache.entries()} == {names[1], names[0]}
    assert len(list((tmp_path / "cache").iterdir())) == 4    # the live writer, the units
    used = {u["name"] for p in cache.entries()
            for u in json.loads((p / INDEX).read_text())["units"]}
    assert {p.name for p in (tmp_path / "cache" / cache_module.UNITS).iterdir()} == used


def test_nothing_in_the_cache_names_a_patient_and_it_is_private(site, tmp_path):
    """Attack: a PACS export whose folders are named after the patient and study. The cache's
    file names and index must carry none of that (nor any header value or UID), and only the
    site's account may read it."""
    leaks: set[str] = set(phi_strings(site))
    for path in sorted((site / "dicom").rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            folder = (f"{ds.PatientName}_{ds.PatientID}".replace("^", "_"),
                      str(ds.StudyInstanceUID))
        except Exception:  # noqa: BLE001 - the fixture's junk files stay where they are
            continue
        leaks.update({folder[0], folder[1], str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                      path.stem})
        target = site / "dicom" / folder[0] / folder[1] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    leaks = {s for s in leaks if len(s) >= 6}
    assert leaks
    cache = SiteCache(tmp_path / "cache")
    read_site(site, None, CLASSES, key=KEY, cache=cache)
    everything = list((tmp_path / "cache").rglob("*"))
    units = list((tmp_path / "cache" / cache_module.UNITS).iterdir())
    assert units
    text = "\n".join([p.name for p in everything]
                     + [p.read_text() for p in everything if p.suffix == ".json"]
                     + [json.dumps(cache_files.read_unit_index(p, p.name)) for p in units])
    assert not [s for s in leaks if s in text]
    for path in [tmp_path / "cache", *everything]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path.name, oct(mode))
    assert sorted(os.listdir(tmp_path / "cache")) == sorted([cache.entries()[0].name,
                                                            cache_module.UNITS])


def test_a_deployed_site_process_reads_through_the_cache_a_simulation_does_not(
        site, tmp_path, monkeypatch):
    """A second site process (a fresh per-process SiteDataCache) trains on the same tensors
    without decoding; a simulated site has no cache of its own (the simulation's shared
    temp folder: tests/client/test_sim_cache.py) and writes nothing into its folder."""
    import torch
    from flwr.app import Context, RecordDict

    from client.runtime import SiteDataCache, resolve_site
    from protocol import wire

    deployed = resolve_site(Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                                    node_config={wire.NODE_DATA_DIR: str(site)}))
    assert deployed.cache_dir == site / ".medfed" / "cache"
    _, first = SiteDataCache().get(deployed, CLASSES, 32)
    assert len(SiteCache(deployed.cache_dir).entries()) == 1
    no_decoding(monkeypatch)
    _, second = SiteDataCache().get(deployed, CLASSES, 32)
    for split in ("train", "val", "test"):
        assert len(first[split]) == len(second[split]) > 0
        assert second[split].rows is not None               # prepared images on disk
        for i in range(len(first[split])):
            assert torch.equal(first[split].image(i), second[split].image(i))
            assert all(torch.equal(x, y) for x, y in zip(first[split].items[i][1:],
                                                         second[split].items[i][1:]))
    monkeypatch.undo()
    root = tmp_path / "sim"
    shutil.copytree(site, root / "site-0", ignore=shutil.ignore_patterns(".medfed"))
    simulated = resolve_site(Context(run_id=1, node_id=7, state=RecordDict(),
                                     node_config={wire.NODE_PARTITION_ID: 0},
                                     run_config={wire.RUN_SIM_DATA_ROOT: str(root)}))
    assert simulated.cache_dir is None
    SiteDataCache().get(simulated, CLASSES, 32)
    assert not list(root.rglob("*.npy")) and not list(root.rglob(INDEX))


def test_prepared_rows_on_disk_equal_in_memory_items_and_are_reused(site, tmp_path,
                                                                    monkeypatch):
    """A dataset reading its images from a row file gives the same items as one holding
    them in memory (augmented ones too, under the same seed); a second dataset of the same
    studies reopens the file without preparing anything; a damaged file is rewritten."""
    import torch

    from client.data import dataset as dataset_module
    from client.data.dataset import StudyDataset

    studies = read_site(site, None, CLASSES, key=KEY).studies
    store = tmp_path / "store"
    store.mkdir()
    memory = StudyDataset(studies, 24, augment=True)
    disk = StudyDataset(studies, 24, augment=True, store=store)
    assert disk.rows is not None and memory.rows is None
    assert all(item[0] is None for item in disk.items)
    memory.reseed(11)
    disk.reseed(11)
    for i in range(len(studies)):
        a, b = memory[i], disk[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    [row_file] = store.glob("rows-*.npy")
    assert stat.S_IMODE(row_file.stat().st_mode) == 0o600
    # another site process prunes the cache while this one trains: its rows stay readable
    opened = StudyDataset(studies, 24, store=store)
    moved = row_file.rename(row_file.with_suffix(".away"))
    assert torch.equal(opened.image(len(studies) - 1), memory.image(len(studies) - 1))
    moved.rename(row_file)

    def no_resize(*args, **kwargs):
        raise AssertionError("prepared again although the row file was complete")
    monkeypatch.setattr(dataset_module, "resize", no_resize)
    again = StudyDataset(studies, 24, store=store)
    assert all(torch.equal(memory.image(i), again.image(i)) for i in range(len(studies)))
    monkeypatch.undo()
    with open(row_file, "r+b") as f:                   # a crash mid-write, or a bad disk
        f.truncate(row_file.stat().st_size - 100)
    fixed = StudyDataset(studies, 24, store=store)
    assert all(torch.equal(memory.image(i), fixed.image(i)) for i in range(len(studies)))
    # other studies (even as many, in another order) or another size: another file, never
    # someone else's rows
    backwards = StudyDataset(studies[::-1], 24, store=store)
    assert all(torch.equal(memory.image(len(studies) - 1 - i), backwards.image(i))
               for i in range(len(studies)))
    StudyDataset(studies, 16, store=store)
    assert len(list(store.glob("rows-*.npy"))) == 3


def _maps_under(folder) -> int:
    """Memory maps this process holds of files under ``folder`` (its /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return sum(str(folder) in line for line in f)


def test_a_site_past_the_map_budget_holds_a_bounded_number_of_maps(site, tmp_path):
    """Linux allows a process 65,530 memory maps; one per study failed past ~60,000 studies.
    With a budget of 4 maps a site of ~20 studies is served whole, and reading every image
    of every study never holds more than 4 of its unit files mapped (the lesion masks are
    one side entry of the version, a map or two whatever the site's size)."""
    root = tmp_path / "cache"
    units = root / cache_module.UNITS
    read_site(site, None, CLASSES, key=KEY, cache=SiteCache(root, maps=UnitMaps(4)))
    cache = SiteCache(root, maps=UnitMaps(4))
    served = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "hit" and len(served.studies) > 8
    fresh = read_site(site, None, CLASSES, key=KEY)
    assert_same(fresh, served)                       # touches every image of every study
    assert _maps_under(units) <= 4
    assert cache.maps.mapped > 4                     # read lazily: more maps made than held
    for study in served.studies:                     # and again, in another order
        for name in reversed(list(study.images)):
            assert study.images[name].shape
            assert _maps_under(units) <= 4


def test_a_damaged_unit_past_the_map_budget_is_found_when_opened(site, tmp_path):
    """A unit mapped only when read is still checked when the version is opened (its file's
    size against its index), so a damaged one is decoded again, not served."""
    root = tmp_path / "cache"
    cache = SiteCache(root, maps=UnitMaps(2))        # one unit mapped at once, the rest later
    fresh = read_site(site, None, CLASSES, key=KEY, cache=cache)
    version = json.loads((cache.entries()[0] / INDEX).read_text())
    lazy = root / cache_module.UNITS / next(u["name"] for u in version["units"][1:]
                                             if u["index"]["groups"])
    with open(lazy, "r+b") as f:
        f.truncate(lazy.stat().st_size - 4096)
    rebuilt = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "rebuilt" and cache.decoded_units == 1
    assert_same(fresh, rebuilt)


def test_a_meanwhile_hook_without_the_callers_pool_is_refused(site, tmp_path):
    """Work handed to the cache's own temporary processes would be cut off when they end on
    return, before the caller joins it: the hook needs the caller's pool."""
    from functools import partial

    from client.data.site import dicom_folder

    cache, called = SiteCache(tmp_path / "cache"), []
    decode = partial(layout_site._decode_files, "dicom", site, None, KEY, 1)
    with pytest.raises(ValueError, match="meanwhile hook needs the caller's pool"):
        cache.decoded(dicom_folder(site), None, KEY, decode, workers=2,
                      meanwhile=lambda: called.append(1))
    assert not called and not any((tmp_path / "cache").glob("*/" + INDEX))
