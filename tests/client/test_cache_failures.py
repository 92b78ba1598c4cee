"""The site cache when an ingest fails part-way: nothing patient-derived stays on disk (no
spill file, no unit under a temporary name), the one filesystem sync comes before any unit
is published and a failing one publishes nothing, units published before a failure are
served from their names, an unwritable ingest stays within the process's map budget and
makes in-memory units itself; and a cached unit reads its files in the order a fresh
decode does."""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.data import cache as cache_module
from client.data import cache_build, cache_reads
from client.data.cache import SiteCache
from client.data.cache_files import UnitMaps, write_reason
from client.data.cache_reads import FileReader
from client.data.layout_site import _decode_files, read_site
from client.data.site import decode_site, join_shares, read_share
from client.data.workers import SharedWorkers, WorkerDied
from tests.client.test_cache import KEY, assert_same, boom, site  # noqa: F401 - the fixture
from tests.conftest import CLASSES


def _left_on_disk(cache_root: Path) -> list[str]:
    """Names of the files under the cache (spills and temporary units included)."""
    return sorted(p.name for p in cache_root.rglob("*") if p.is_file())


def _raising_on(name: str, path: str):
    """:func:`read_share` that raises on the file called ``name``."""
    if Path(path).name == name:
        raise RuntimeError("reader failed")
    return read_share(KEY, path)


def test_a_read_failing_on_the_last_file_leaves_no_spill_behind(site, tmp_path):
    """The one read pass spills each task's pixels to disk before the caller learns the
    spills' names: a read raising on the last file must still take every spill with it
    (it left 18 patient-pixel files in units/), on every retry."""
    last = sorted((site / "dicom").rglob("*"))[-1].name
    reader = FileReader(partial(_raising_on, last), join_shares)
    cache = SiteCache(tmp_path / "cache")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="reader failed"):
            cache.decoded(site / "dicom", None, KEY, boom, reader=reader)
    assert (tmp_path / "cache" / "units").is_dir()
    assert _left_on_disk(tmp_path / "cache") == []


def test_a_unit_build_failing_part_way_leaves_nothing_behind(site, tmp_path):
    """Units made before the failing one were written under temporary names: the failed
    ingest removes them (and the spills), so no decoded pixels stay on disk; they are
    counted all the same."""
    calls = []

    def join_failing_on_the_fourth(shares):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("join failed")
        return join_shares(shares)
    cache = SiteCache(tmp_path / "cache")
    with pytest.raises(RuntimeError, match="join failed"):
        cache.decoded(site / "dicom", None, KEY, boom,
                      reader=FileReader(partial(read_share, KEY), join_failing_on_the_fourth))
    assert len(calls) == 4
    assert _left_on_disk(tmp_path / "cache") == []
    # decoded_units counts units as each is complete: the three made before the failure
    # (counted after the pass, a failure lost them)
    assert cache.decoded_units == 3


def _recording(monkeypatch, fail_sync: bool = False, fail_publish_at: int | None = None):
    """Record the cache's sync and publish calls in order (a sync as ``sync`` and the names
    of the files under the units' folder then); make the sync fail, or the publish of the
    ``fail_publish_at``-th unit (a full disk)."""
    calls: list = []
    real_sync, real_publish = cache_build.sync_filesystem, cache_build.publish

    def sync(path):
        calls.append("sync")
        calls.append(sorted(p.name for p in Path(path).iterdir()))
        if fail_sync:
            raise OSError(5, "Input/output error", "/pacs/Doe^Jane")
        real_sync(path)

    def publish(temp, final):
        if final.parent.name != "units":            # a side entry (the masks)
            return real_publish(temp, final)
        calls.append("publish")
        if calls.count("publish") == fail_publish_at:
            raise OSError(28, "No space left on device", "/pacs/Doe^Jane")
        real_publish(temp, final)
    monkeypatch.setattr(cache_build, "sync_filesystem", sync)
    monkeypatch.setattr(cache_build, "publish", publish)
    return calls


def _spilled(monkeypatch) -> list[str]:
    """The names of the spill files the read pass writes (recorded as it returns them)."""
    names: list[str] = []
    real = cache_module.read_files

    def recording(*args):
        spill, reads = real(*args)
        if spill is not None:
            names.append(Path(spill).name)
        return spill, reads
    monkeypatch.setattr(cache_module, "read_files", recording)
    return names


def test_the_sync_comes_before_any_unit_is_published_and_after_the_spills_went(
        site, tmp_path, monkeypatch):
    """One sync, then the renames; by then the read pass's spill files (every unit made
    from them) are removed, so the sync never writes them back."""
    calls, spills = _recording(monkeypatch), _spilled(monkeypatch)
    cache = SiteCache(tmp_path / "cache")
    read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "miss" and cache.decoded_units > 4 and spills
    sync, at_sync, *published = calls
    assert sync == "sync" and published == ["publish"] * cache.decoded_units
    assert len(at_sync) == cache.decoded_units          # the units' temporary files only
    assert not set(spills) & set(at_sync) and not any("spill" in n for n in at_sync)


def test_a_published_unit_failing_its_checks_is_read_again_from_its_files(
        site, tmp_path, monkeypatch):
    """A unit whose copy under its name fails its checks once published (a racing writer's
    bad copy) is served by reading its files again - its spill is gone by then - and the
    ingest serves what a fresh decode gives, from memory."""
    real_publish = cache_build.publish
    cut = []

    def publish_then_cut(temp, final):
        real_publish(temp, final)
        if not cut:                                 # the first unit: cut its footer off
            cut.append(final.name)
            os.truncate(final, final.stat().st_size - 3)
    monkeypatch.setattr(cache_build, "publish", publish_then_cut)
    spills = _spilled(monkeypatch)
    cache = SiteCache(tmp_path / "cache")
    served = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cut and spills
    assert cache.last == "unwritable"
    assert cache.write_error == "CacheCorrupt: a unit failed its checks"
    monkeypatch.undo()
    assert_same(read_site(site, None, CLASSES, key=KEY), served)


def test_a_failing_sync_publishes_nothing_and_stays_in_the_map_budget(site, tmp_path,
                                                                      monkeypatch):
    """Units not known durable are never found under their names; served from memory,
    they count against the process's map budget (past it they are read, not mapped) and
    leave no file behind."""
    _recording(monkeypatch, fail_sync=True)
    maps = UnitMaps(max_maps=2)                      # one unit may be mapped for good
    cache = SiteCache(tmp_path / "cache", maps=maps)
    served = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "unwritable" and cache.write_error == "OSError: Input/output error"
    assert cache.decoded_units > 4 and cache.entries() == []
    assert _left_on_disk(tmp_path / "cache") == []   # no unit under its name, no temp
    assert maps.pinned <= 1
    with open("/proc/self/maps") as f:
        assert sum(str(tmp_path / "cache") in line for line in f) <= 1
    monkeypatch.undo()
    assert_same(read_site(site, None, CLASSES, key=KEY), served)


def test_units_published_before_a_failed_publish_are_served_from_their_names(
        site, tmp_path, monkeypatch):
    """A publish failing on the third unit: the two before are opened under their names,
    the rest from their temporary files; no unit is decoded twice."""
    _recording(monkeypatch, fail_publish_at=3)
    joins = []

    def counted_join(shares):
        joins.append(1)
        return join_shares(shares)
    cache = SiteCache(tmp_path / "cache")
    studies, report = cache.decoded(site / "dicom", None, KEY, boom,
                                    reader=FileReader(partial(read_share, KEY), counted_join))
    assert cache.last == "unwritable" and cache.write_error == "OSError: No space left on device"
    assert len(joins) == cache.decoded_units > 4      # none decoded again
    assert len(_left_on_disk(tmp_path / "cache")) == 2   # the two published units only
    fresh_studies, fresh_report = decode_site(site, key=KEY)
    assert [s.key for s in studies] == [s.key for s in fresh_studies]
    for a, b in zip(fresh_studies, studies):
        for name in a.images:
            np.testing.assert_array_equal(a.images[name], b.images[name])
    assert report.as_dict() == fresh_report.as_dict()


def _holds_array(obj) -> bool:
    """Whether an array is among ``obj``'s lists and tuples."""
    if isinstance(obj, np.ndarray):
        return True
    return isinstance(obj, (list, tuple)) and any(_holds_array(x) for x in obj)


_MKSTEMP = cache_reads.tempfile.mkstemp


def _spill_refused(*args, prefix: str = "", **kwargs):
    """``tempfile.mkstemp`` with no quota left for spill files (other callers unharmed)."""
    if "spill-" in prefix:
        raise OSError(122, "Disk quota exceeded")
    return _MKSTEMP(*args, prefix=prefix, **kwargs)


def test_unspillable_arrays_are_joined_here_not_sent_to_every_helper(site, tmp_path,
                                                                     monkeypatch):
    """No inode or quota left for a spill file: the read falls back to keeping the arrays
    (it crashed), and the units holding them are made in this process - sent to the
    helpers, each would receive the whole job's pixels."""
    monkeypatch.setattr(cache_reads.tempfile, "mkstemp", _spill_refused)
    real_imap, sent = SharedWorkers.imap, []

    def recording_imap(self, fn, items):
        if self.workers > 1 and len(items) > 1:
            sent.append(items)
        return real_imap(self, fn, items)
    monkeypatch.setattr(SharedWorkers, "imap", recording_imap)
    cache = SiteCache(tmp_path / "cache")
    served = read_site(site, None, CLASSES, key=KEY, workers=2, cache=cache)
    monkeypatch.undo()
    assert cache.last == "miss" and cache.decoded_units > 4
    assert sent and not _holds_array(sent)
    assert_same(read_site(site, None, CLASSES, key=KEY), served)


def _slice(site_dir: Path, folder: str, study: str, series: str, scale: int) -> None:
    """A copy of one of the site's images as instance 1 of a new two-file series."""
    source = next(p for p in sorted((site_dir / "dicom").rglob("*.dcm"))
                  if "PixelData" in pydicom.dcmread(p))
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, 1
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.PixelData = (ds.pixel_array // scale).astype(ds.pixel_array.dtype).tobytes()
    (site_dir / "dicom" / folder).mkdir()
    ds.save_as(site_dir / "dicom" / folder / "1.dcm")


def test_a_units_files_are_read_in_a_fresh_decodes_order(site, tmp_path):
    """Two slices of one series with the same instance number, in ``ser/`` and ``ser-2/``:
    stacked in file order, which as strings is the reverse of a fresh decode's (Paths,
    part by part). Both cache paths (one read per file; a decode per unit) give the
    fresh decode's volume."""
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    _slice(site, "ser", study, series, 1)
    _slice(site, "ser-2", study, series, 3)
    fresh = read_site(site, None, CLASSES, key=KEY)
    assert any(a.ndim == 3 and a.shape[0] == 2 for s in fresh.studies
               for a in s.images.values())                   # the two-slice volume
    assert_same(fresh, read_site(site, None, CLASSES, key=KEY,
                                 cache=SiteCache(tmp_path / "by-file")))
    per_unit = partial(_decode_files, "dicom", site, None, KEY, 1)
    studies, _ = SiteCache(tmp_path / "by-unit").decoded(site / "dicom", None, KEY, per_unit)
    assert [s.key for s in studies] == [s.key for s in fresh.studies]
    for a, b in zip(fresh.studies, studies):
        for name in a.images:
            np.testing.assert_array_equal(a.images[name], b.images[name])


def test_a_write_reason_names_only_the_type_of_a_non_os_error():
    assert write_reason(ValueError("Doe^Jane 1970-01-01")) == "ValueError"
    assert write_reason(OSError(28, "No space left on device", "/pacs/Doe")) == \
        "OSError: No space left on device"


def test_a_cache_folder_that_cannot_be_made_is_served_from_memory_with_its_reason(
        site, tmp_path, caplog):
    """The cache's folder cannot be created (a file is in its way): the ingest decodes,
    serves from memory and says why - the OS's reason, in the state and in the log line,
    never the path."""
    (tmp_path / "blocked").write_bytes(b"")
    cache = SiteCache(tmp_path / "blocked" / "cache")
    with caplog.at_level("WARNING", logger="client.data.cache_build"):
        served = read_site(site, None, CLASSES, key=KEY, cache=cache)
    assert cache.last == "unwritable" and cache.decoded_units > 4
    assert cache.write_error == "NotADirectoryError: Not a directory"
    assert [r.getMessage() for r in caplog.records] == [
        "site cache: could not write the decoded studies (NotADirectoryError: Not a "
        "directory); serving them from memory this time"]
    assert "blocked" not in caplog.text
    assert_same(read_site(site, None, CLASSES, key=KEY), served)


def _killed_in_a_helper(caller: int, markers: str, site_dir: str, files: list[Path]):
    """The brain reader on a unit. A helper makes (and so writes) its first unit, then is
    SIGKILLed on its second (the OOM killer, mid-ingest); the caller waits (up to 2 min)
    for that, so the helper has the units."""
    first, killed = Path(markers) / "first", Path(markers) / "killed"
    if os.getpid() != caller:
        if first.exists():
            killed.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        first.touch()
        return decode_site(Path(site_dir), key=KEY, paths=files)
    deadline = time.monotonic() + 120
    while not killed.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return decode_site(Path(site_dir), key=KEY, paths=files)


def test_a_helper_killed_mid_ingest_publishes_nothing_and_the_next_ingest_works(
        site, tmp_path):
    """A decode helper SIGKILLed after writing a unit under its temporary name: the ingest
    fails (WorkerDied, not a hang), no unit is published, no version written, nothing
    patient-derived stays on disk; the next ingest decodes and serves the site."""
    cache = SiteCache(tmp_path / "cache")
    decode = partial(_killed_in_a_helper, os.getpid(), str(tmp_path), str(site))
    with pytest.raises(WorkerDied):
        cache.decoded(site / "dicom", None, KEY, decode, workers=2)
    assert (tmp_path / "killed").exists() and (tmp_path / "first").exists()
    assert _left_on_disk(tmp_path / "cache") == [] and cache.entries() == []
    served = read_site(site, None, CLASSES, key=KEY, workers=2, cache=cache)
    assert cache.last == "miss" and len(cache.entries()) == 1
    assert_same(read_site(site, None, CLASSES, key=KEY), served)


def test_the_masks_and_reports_go_to_the_helpers_before_the_sync(site, tmp_path,
                                                                 monkeypatch):
    """A first ingest with two workers hands the masks and reports to the helpers once the
    units are made, before this process's serial rest (sync, renames, index), not after
    it: the helpers would sit idle through it. Same data as a fresh read."""
    assert (site / "segmentations.csv").is_file() and (site / "reports.jsonl").is_file()
    calls = _recording(monkeypatch)
    real_submit = SharedWorkers.submit

    def submit(self, fn, items):
        calls.append(("submit", len(items), self.started))
        return real_submit(self, fn, items)
    monkeypatch.setattr(SharedWorkers, "submit", submit)
    cache = SiteCache(tmp_path / "cache")
    served = read_site(site, None, CLASSES, key=KEY, workers=2, cache=cache)
    submitted = [c for c in calls if isinstance(c, tuple)]
    assert len(submitted) == 1 and submitted[0][1] >= 2 and submitted[0][2]
    assert calls.index(submitted[0]) < calls.index("sync")
    assert_same(read_site(site, None, CLASSES, key=KEY), served)


@pytest.mark.parametrize("broken", ["segmentations.csv", "reports.jsonl"])
def test_a_bad_side_table_fails_the_ingest_after_the_cache_is_published(site, tmp_path,
                                                                        monkeypatch, broken):
    """A ``segmentations.csv`` with the wrong columns (or a ``reports.jsonl`` that is not
    text) read by the helpers during the build fails the ingest with its own error, but only
    once the decoded studies are published: the retry after the operator's fix decodes
    nothing."""
    from client.data.site import SiteDataError

    path = site / broken
    if broken == "segmentations.csv":
        path.write_text("study,file\n1.2.3,mask.nii.gz\n")
        expected = SiteDataError
    else:
        path.write_bytes(b"\xff\xfe\xfa not utf-8\n")
        expected = UnicodeDecodeError
    cache = SiteCache(tmp_path / "cache")
    with pytest.raises(expected):
        read_site(site, None, CLASSES, key=KEY, workers=2, cache=cache)
    assert cache.last == "miss" and cache.decoded_units >= 4
    assert len(cache.entries()) == 1
    with pytest.raises(expected):                   # not fixed yet: the same error, no decode
        read_site(site, None, CLASSES, key=KEY, workers=2, cache=cache)
    assert cache.last == "hit" and cache.decoded_units == 0
