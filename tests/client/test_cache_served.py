"""The site cache while versions are being served: pruning never removes a unit a served
version of this process still maps when read; the memory-map budget is the process's, not
each cache's; counting a served version's bytes maps nothing; a decode process's failed
write comes back with its reason (type and OS text, no path); the unit file holds exactly
the layout its index implies."""

from __future__ import annotations

import gc
import os
import shutil
import time
from pathlib import Path

import numpy as np

from client.data import cache_files
from client.data.cache import SiteCache
from client.data.cache_files import PROCESS_MAPS, UnitMaps
from client.data.layout_site import read_site
from client.data.site import IngestReport, Study, decode_site
from tests.client.test_cache import KEY, assert_same, site  # noqa: F401 - the site fixture
from tests.conftest import CLASSES


def _maps_under(folder) -> int:
    """Memory maps this process holds of files under ``folder`` (its /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return sum(str(folder) in line for line in f)


def test_a_served_version_survives_the_pruning_of_its_units(site, tmp_path):
    """Serve version A with most units mapped only when read, write versions until A and
    every unit of it are pruned from the index (keep=1), then read every image of A: no
    error, the same pixels. The units A still reads stay on disk until A is dropped; the
    next prune after that removes them (disk use stays bounded)."""
    maps = UnitMaps(2)                               # one unit mapped now, the rest when read
    root = tmp_path / "cache"
    cache = SiteCache(root, keep=1, maps=maps)
    read_site(site, None, CLASSES, key=KEY, cache=cache)              # written
    served = read_site(site, None, CLASSES, key=KEY, cache=cache)     # version A, served
    assert cache.last == "hit"
    version_a = cache.current
    for other in (b"other-key-1", b"other-key-2"):                    # every study changes
        read_site(site, None, CLASSES, key=other.ljust(32, b"."), cache=cache)
    assert not version_a.exists() and len(cache.entries()) == 1       # A pruned
    fresh = read_site(site, None, CLASSES, key=KEY)
    assert_same(fresh, served)                       # every image of A, mapped now
    assert maps.mapped > 2
    kept = {p.name for p in (root / "units").iterdir()}
    del served
    gc.collect()
    cache.prune()
    assert len({p.name for p in (root / "units").iterdir()}) < len(kept)   # A's went


def test_the_map_budget_is_the_processs_not_each_caches(site, tmp_path):
    """Two caches (two sites, or two served versions) each within a budget of their own
    could together pass the kernel's limit on maps a process holds: they share one."""
    assert SiteCache(tmp_path / "a").maps is SiteCache(tmp_path / "b").maps is PROCESS_MAPS
    maps = UnitMaps(4)
    other = shutil.copytree(site, tmp_path / "site-1")
    served = []
    for folder, key in ((site, KEY), (other, b"second-site".ljust(32, b"."))):
        cache = SiteCache(tmp_path / f"cache-{folder.name}", maps=maps)
        read_site(folder, None, CLASSES, key=key, cache=cache)        # written, dropped
        gc.collect()
        served.append(read_site(folder, None, CLASSES, key=key, cache=cache))
        assert cache.last == "hit"
    for a, b in zip(*(data.studies for data in served)):  # both read, interleaved
        for study in (a, b):
            for name in study.images:
                assert study.images[name].shape
                assert sum(_maps_under(tmp_path / f"cache-{f}" / "units")
                           for f in ("site-0", "site-1")) <= 4   # masks: side entries
    assert maps.mapped > 4 and maps.pinned == 2
    del served, a, b, study
    gc.collect()
    assert maps.pinned == 0                           # a dropped version gives its maps back


def test_counting_a_served_versions_bytes_maps_nothing(site, tmp_path):
    """The site process's data budget counts the bytes of what it serves: from the units'
    indexes, not by mapping every unit to ask its arrays."""
    from client.runtime import _image_bytes

    root = tmp_path / "cache"
    read_site(site, None, CLASSES, key=KEY, cache=SiteCache(root))
    maps = UnitMaps(2)
    served = read_site(site, None, CLASSES, key=KEY, cache=SiteCache(root, maps=maps))
    before = maps.mapped
    counted = _image_bytes(served, {})
    assert maps.mapped == before                      # nothing mapped to count it
    fresh = read_site(site, None, CLASSES, key=KEY)
    expected = sum(a.nbytes for s in fresh.studies for a in s.images.values())
    expected += sum(s.mask.nbytes for s in fresh.studies if s.mask is not None)
    assert counted == expected


class _Unwritable:
    """An image whose bytes cannot be had: writing it fails as a full disk would, with an
    OS error that names a path (which must not travel)."""

    def __array__(self, *args, **kwargs):
        raise OSError(28, "No space left on device", "/pacs/Doe^Jane/study-42")


def _decode_failing_in_a_helper(caller: int, marker: str, site_dir: str,
                                files: list[Path]):
    """The brain reader on a unit; in a helper process the unit gets an image that cannot
    be written. The caller waits (up to 2 min) until a helper has had a unit."""
    studies, report = decode_site(Path(site_dir), key=KEY, paths=files)
    if os.getpid() != caller:
        Path(marker).touch()
        return studies + [Study("bad", "bad", {"t1": _Unwritable()})], report
    deadline = time.monotonic() + 120
    while not Path(marker).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return studies, report


def test_a_helpers_write_failure_comes_back_with_its_reason(site, tmp_path):
    """A unit a helper process could not write is served from memory, and the caller learns
    why: the error's type and the OS's text, never the path the OS error carried."""
    from functools import partial

    cache = SiteCache(tmp_path / "cache")
    decode = partial(_decode_failing_in_a_helper, os.getpid(), str(tmp_path / "marker"),
                     str(site))
    studies, _ = cache.decoded(site / "dicom", None, KEY, decode, workers=2)
    assert (tmp_path / "marker").exists()            # a helper did decode a unit
    assert cache.last == "unwritable"
    assert cache.write_error == "OSError: No space left on device"
    assert "Doe" not in cache.describe() and "pacs" not in cache.describe()
    assert "No space left on device" in cache.describe()
    assert any(s.key == "bad" for s in studies)      # served from memory, not dropped


def test_a_unit_file_holds_exactly_the_layout_its_index_implies(tmp_path):
    """One function gives the arrays' offsets to the writer and to every check: a unit of
    two image shapes is its aligned arrays, its index and a 16-byte footer, nothing else,
    and maps back to the same pixels."""
    rng = np.random.default_rng(0)
    studies = [Study(f"s{i}", f"p{i}", {"t1": rng.random((5, 7), dtype=np.float32),
                                        "vol": rng.integers(0, 9, (3, 4, 5), np.int16)})
               for i in range(3)]
    temp, index = cache_files.write_unit(tmp_path, "unit", studies, IngestReport(files=3),
                                         durable=True)
    offsets, data_bytes = cache_files._data_layout(index["groups"])
    assert all(o % cache_files.ALIGN == 0 for o in offsets) and len(offsets) == 2
    head = cache_files.read_unit_index(temp, "unit")
    assert head == index
    import json
    assert temp.stat().st_size == data_bytes + len(json.dumps(index).encode()) + 16
    back, report = cache_files.open_unit(temp, "unit")
    assert report.files == 3
    for a, b in zip(studies, back):
        for name in a.images:
            np.testing.assert_array_equal(a.images[name], b.images[name])
            assert b.images[name].dtype == a.images[name].dtype


def test_a_units_shares_keep_no_pixels_once_joined(site):
    """The process that coordinates an ingest keeps every new file's share (its image
    without pixels) until the version is written; joining a unit must not put the pixels
    back into them, or that process ends up holding its part of the whole site's pixels
    (it did: +0.1 GB peak RSS on a 1,915-study first ingest, growing with the site)."""
    from client.data.site import join_shares, read_share

    paths = sorted((site / "dicom").rglob("*.dcm"))[:8]
    reads = [read_share(KEY, str(path)) for path in paths]
    shares = [(share, arrays) for _, share, arrays in reads]
    studies, report = join_shares(shares)
    assert studies and report.images > 0
    assert all(image.pixels is None for (image, _), _ in shares if image is not None)
