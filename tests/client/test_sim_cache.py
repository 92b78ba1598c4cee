"""A simulation's sites share one decode per site: the processes that serve a simulated site
(Ray actors, up to one per core) read its decoded studies from the simulation's own temp
folder instead of decoding its DICOM each (issue 27). Counted, not timed."""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import stat
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest
from flwr.app import Context, RecordDict

from client.data import cache_sync
from client.data.dataset import StudyDataset
from client.runtime import SiteDataCache, resolve_site
from protocol import wire
from tests.conftest import CLASSES

FRESH = shutil.ignore_patterns(".medfed")     # another test's deployed cache stays there


def _site(root, partition: int = 0):
    return resolve_site(Context(run_id=1, node_id=partition, state=RecordDict(),
                                run_config={}, node_config={wire.NODE_PARTITION_ID: partition}),
                        root)


def _serve(pickled: bytes, root) -> tuple[int, dict[str, list[float]]]:
    """One site process (a Ray actor) serving site-0 with the app's cache as Ray ships it:
    how many DICOM files it opened, and its prepared images (sums)."""
    import pydicom
    from ray import cloudpickle

    reads = []
    real = pydicom.dcmread

    def counted(*args, **kwargs):
        reads.append(1)
        return real(*args, **kwargs)

    pydicom.dcmread = counted
    cache = cloudpickle.loads(pickled)
    _, splits = cache.get(_site(root), CLASSES, 32)
    return len(reads), {name: [float(split.image(i).sum()) for i in range(len(split))]
                        for name, split in splits.items()}


def _in_new_process(pickled: bytes, root):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(_serve, pickled, root).result()


def _listing(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def test_a_second_process_serving_a_simulated_site_decodes_nothing(tiny_sites, tmp_path):
    """The first process decodes site-0; a second (fresh) one opens no DICOM file and serves
    the same images; a changed file is read again; nothing is written into the site's
    folder; the temp folder is private and gone when the simulation's cache is closed."""
    from ray import cloudpickle

    shutil.copytree(tiny_sites / "site-0", tmp_path / "site-0", ignore=FRESH)
    before = _listing(tmp_path)
    cache = SiteDataCache.for_simulation()
    root = cache.sim_root
    assert root.name.startswith("medfed-sim-sites-")
    assert root.parent == __import__("pathlib").Path(tempfile.gettempdir())
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    pickled = cloudpickle.dumps(cache)

    first_reads, first = _in_new_process(pickled, tmp_path)
    second_reads, second = _in_new_process(pickled, tmp_path)
    assert first_reads > 0                              # the counter sees a decode
    assert second_reads == 0
    assert second == first and sum(len(v) for v in first.values()) > 0
    assert _listing(tmp_path) == before                 # nothing written at the site

    dicom = next(p for p in sorted((tmp_path / "site-0").rglob("*.dcm")))
    os.utime(dicom, ns=(dicom.stat().st_atime_ns, dicom.stat().st_mtime_ns + 10**9))
    changed_reads, _ = _in_new_process(pickled, tmp_path)
    assert changed_reads > 0                            # the changed file is read again

    cache.close()
    assert not root.exists()


def test_the_temp_folder_goes_with_its_owner_not_with_a_copy(tmp_path):
    """A process's unpickled copy never removes the folder; the owner does when collected."""
    from ray import cloudpickle

    cache = SiteDataCache.for_simulation()
    root = cache.sim_root
    copy = cloudpickle.loads(cloudpickle.dumps(cache))
    assert copy.sim_root == root
    copy.close()
    del copy
    gc.collect()
    assert root.is_dir()
    del cache
    gc.collect()
    assert not root.exists()


def test_the_simulation_cache_syncs_nothing_a_deployed_one_does(tiny_sites, tmp_path,
                                                                 monkeypatch):
    """A throw-away temp folder needs no fsync; a deployed site's cache keeps its
    durability (the same counter sees its syncs)."""
    syncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "sync", lambda: syncs.append("sync"))
    monkeypatch.setattr(cache_sync, "_syncfs", lambda: lambda fd: syncs.append("syncfs") or 0)
    shutil.copytree(tiny_sites / "site-0", tmp_path / "sim" / "site-0", ignore=FRESH)
    cache = SiteDataCache.for_simulation()
    _, splits = cache.get(_site(tmp_path / "sim"), CLASSES, 32)
    assert len(splits["train"]) > 0 and any((cache.sim_root / "site-0").iterdir())
    assert syncs == []
    cache.close()

    shutil.copytree(tiny_sites / "site-0", tmp_path / "deployed", ignore=FRESH)
    deployed = resolve_site(Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                                    node_config={wire.NODE_DATA_DIR: str(tmp_path / "deployed")}))
    SiteDataCache().get(deployed, CLASSES, 32)
    assert "syncfs" in syncs and "fsync" in syncs


@pytest.mark.parametrize("shared", [False, True])
def test_an_empty_split_in_a_shared_store_is_an_empty_dataset(tmp_path, shared):
    """A site with no study in a split (a small site's val) is served an empty dataset, not
    an error on every message (an empty row file read into memory)."""
    empty = StudyDataset([], 32, store=tmp_path, shared_store=shared)
    again = StudyDataset([], 32, store=tmp_path, shared_store=shared)     # reopened
    assert len(empty) == len(again) == 0
    assert (empty.rows is None) == shared
    assert len(empty.labels) == 0


def test_a_simulated_site_with_an_empty_split_is_served_through_the_sim_cache(tmp_path):
    """End to end: a two-patient site (a split without any study), read through the
    simulation's cache by one process, then by another that reads it back from the folder."""
    from medfed.synth.sites import synthesize

    root = tmp_path / "data"
    synthesize(root, n_sites=1, seed=7, patients=2)
    cache = SiteDataCache.for_simulation()
    _, splits = cache.get(_site(root), CLASSES, 32)
    sizes = {name: len(split) for name, split in splits.items()}
    assert 0 in sizes.values() and sum(sizes.values()) > 0, sizes
    _, again = SiteDataCache(sim_root=cache.sim_root).get(_site(root), CLASSES, 32)
    assert {name: len(split) for name, split in again.items()} == sizes
    cache.close()


def test_a_closed_or_opened_up_folder_is_never_used_nor_made_again(tiny_sites, tmp_path):
    """Attack on a shared /tmp: once the owner removed the folder, a process still holding
    its name must not re-create it (with the umask's mode, where another user could have
    planted a cache version first); a folder others may enter is not used either. Both
    read the site in memory instead."""
    from ray import cloudpickle

    shutil.copytree(tiny_sites / "site-0", tmp_path / "site-0", ignore=FRESH)
    cache = SiteDataCache.for_simulation()
    root = cache.sim_root
    copy = cloudpickle.loads(cloudpickle.dumps(cache))      # another process's copy
    cache.close()
    assert cache.sim_root is None and not root.exists()
    _, splits = copy.get(_site(tmp_path), CLASSES, 32)
    assert sum(len(s) for s in splits.values()) > 0
    assert not root.exists()

    opened = tmp_path / "opened"
    opened.mkdir(mode=0o755)
    os.chmod(opened, 0o755)
    _, splits = SiteDataCache(sim_root=opened).get(_site(tmp_path), CLASSES, 32)
    assert sum(len(s) for s in splits.values()) > 0
    assert list(opened.iterdir()) == []


def test_a_process_serving_a_site_as_the_simulation_ends_does_not_make_its_folder_again(
        tiny_sites, tmp_path, monkeypatch):
    """The simulation removes its temp folder while an actor is reading a site (after any
    check of the folder): the actor serves the site from memory and does not make the
    folder again (a umask-mode leftover in TMPDIR)."""
    from client import runtime

    shutil.copytree(tiny_sites / "site-0", tmp_path / "site-0", ignore=FRESH)
    cache = SiteDataCache.for_simulation()
    root = cache.sim_root
    actor = SiteDataCache(max_sites=None, sim_root=root)      # an actor's copy of it
    real = runtime.read_site

    def ended_meanwhile(*args, **kwargs):
        shutil.rmtree(root)             # the simulation ends while this site is read
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime, "read_site", ended_meanwhile)
    _, splits = actor.get(_site(tmp_path), CLASSES, 32)
    assert len(splits["train"]) > 0
    assert not root.exists()
    cache.close()
