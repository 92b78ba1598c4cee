"""The site's data cache: keyed by what the data is a function of - the site, the class
names, the image size and the task's ``DataNeeds`` - so two tasks on one site are never
served each other's data (BUG 5: masks and the report tokenizer were not in the key)."""

from __future__ import annotations

import os
import shutil

import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict

from client.app import make_client_app
from client.job import decode_job
from client.runtime import SiteDataCache, resolve_site
from models import TASKS
from models.task import DataNeeds, ReportText
from protocol import wire
from server.config import load_experiment
from server.federation import job_config
from tests.conftest import CLASSES


def _context(site_dir) -> Context:
    return Context(run_id=1, node_id=7, node_config={wire.NODE_DATA_DIR: str(site_dir)},
                   state=RecordDict(), run_config={})


@pytest.fixture
def site(tiny_sites, tmp_path):
    """A private copy of one synthetic site (the cache and the ledger see only this one)."""
    shutil.copytree(tiny_sites / "site-0", tmp_path / "site-0")
    return resolve_site(_context(tmp_path / "site-0"))


def test_a_segmenter_after_a_classifier_gets_masks_and_only_masked_studies(site):
    cache = SiteDataCache()
    _, plain = cache.get(site, CLASSES, 32, TASKS.build("classification", {}).data_needs)
    data, masked = cache.get(site, CLASSES, 32, TASKS.build("segmentation", {}).data_needs)
    assert masked is not plain
    assert "mask" not in plain["train"][0]
    for split in ("train", "val", "test"):
        assert {"mask", "has_mask"} <= set(masked[split][0])
    with_mask = [s for s in data.split("train", labelled_only=True) if s.mask is not None]
    assert len(masked["train"]) == len(with_mask) > 0
    # and back: the classifier is not served the segmenter's splits either
    _, again = cache.get(site, CLASSES, 32, DataNeeds())
    assert again is plain


def test_two_report_tokenizations_on_one_site_are_kept_apart(site):
    cache = SiteDataCache()
    long = DataNeeds(unlabelled=True, reports=ReportText.of(None, 128))
    short = DataNeeds(unlabelled=True, reports=ReportText.of(None, 16))
    _, a = cache.get(site, CLASSES, 32, long)
    _, b = cache.get(site, CLASSES, 32, short)
    assert a["train"][0]["input_ids"].shape == (128,)
    assert b["train"][0]["input_ids"].shape == (16,)
    assert cache.get(site, CLASSES, 32, long)[1] is a       # equal needs: a cache hit


def test_image_size_class_names_and_label_fraction_are_part_of_the_key(site):
    cache = SiteDataCache()
    _, base = cache.get(site, CLASSES, 32)
    assert cache.get(site, CLASSES, 32, DataNeeds())[1] is base
    assert cache.get(site, CLASSES, 16)[1]["train"][0]["image"].shape[-1] == 16
    _, fewer = cache.get(site, CLASSES, 32, DataNeeds(label_fraction=0.5))
    assert 0 < len(fewer["train"]) < len(base["train"])


def _train_message(overrides: list[str], server_round: int = 1) -> Message:
    """A train request as the server sends it, with the task's initial weights."""
    record = job_config(load_experiment(overrides))
    record[wire.SERVER_ROUND] = server_round
    model, _ = decode_job(record, site_seed=0).build()
    content = RecordDict({wire.CONFIG: record, wire.ARRAYS: ArrayRecord(model.state_dict())})
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def test_one_client_app_trains_a_classifier_then_a_segmenter_on_the_same_site(
        site, task_identity):
    """Through the ClientApp: before the fix the segmenter was handed the classifier's
    cached splits (no masks) and its step failed on the missing ``has_mask``."""
    app = make_client_app()
    context = _context(site.data_dir)
    small = ["model=mmvit_tiny", "task.image_size=32", "train.local_epochs=1",
             "train.batch_size=8"]
    app(_train_message(small), context)
    reply = app(_train_message(small + ["task=lesion_seg", "task.image_size=32"]), context)
    assert not reply.has_error(), reply.error
    data, splits = SiteDataCache().get(site, CLASSES, 32, DataNeeds(masks=True))
    n = reply.content[wire.METRICS][wire.NUM_EXAMPLES]
    assert n == len(splits["train"]) == sum(
        s.mask is not None for s in data.split("train", labelled_only=True))


def test_a_simulated_site_reads_its_data_once_though_each_message_ships_a_new_app_copy(
        tiny_sites, tmp_path, monkeypatch, task_identity):
    """Flower's Ray backend pickles the ClientApp (closures and all) into the actor with every
    message; the copy's data cache is the actor process's cache of that app, so the second
    message reads no DICOM file (counted) - and a changed file is read again."""
    from ray import cloudpickle

    from client import runtime

    shutil.copytree(tiny_sites / "site-0", tmp_path / "site-0")
    reads = []

    def counted(*args, **kwargs):
        reads.append(1)
        return real(*args, **kwargs)

    real = runtime.read_site
    monkeypatch.setattr(runtime, "read_site", counted)
    app = make_client_app(sim_data_root=tmp_path)
    context = Context(run_id=1, node_id=7, node_config={wire.NODE_PARTITION_ID: 0},
                      state=RecordDict(), run_config={})
    small = ["model=mmvit_tiny", "task.image_size=32", "train.local_epochs=1",
             "train.batch_size=8"]

    def message(server_round: int) -> Message:
        shipped = cloudpickle.loads(cloudpickle.dumps(app))     # as Ray ships it per message
        reply = shipped(_train_message(small, server_round), context)
        assert not reply.has_error(), reply.error
        return reply

    message(1)
    message(2)
    assert len(reads) == 1
    dicom = next(p for p in sorted((tmp_path / "site-0").rglob("*")) if p.is_file()
                 and p.suffix == ".dcm")
    os.utime(dicom, ns=(dicom.stat().st_atime_ns, dicom.stat().st_mtime_ns + 10**9))
    message(3)
    assert len(reads) == 2


def test_a_simulation_cache_keeps_every_site_its_byte_budget_allows(tiny_sites, tmp_path,
                                                                    monkeypatch):
    """Sites in turn (as a simulation process meets them each round): within the budget every
    site stays read; beyond it the oldest goes, and the newest always stays."""
    from client import runtime

    sites = []
    for i in (0, 1):
        shutil.copytree(tiny_sites / f"site-{i}", tmp_path / f"site-{i}")
        sites.append(resolve_site(Context(run_id=1, node_id=i, node_config={
            wire.NODE_PARTITION_ID: i}, state=RecordDict(), run_config={}), tmp_path))
    largest = max(runtime._image_bytes(*SiteDataCache().get(s, CLASSES, 32)) for s in sites)
    reads = []
    real = runtime.read_site
    monkeypatch.setattr(runtime, "read_site", lambda *a, **k: reads.append(1) or real(*a, **k))

    both = SiteDataCache(max_sites=None, max_bytes=3 * largest)
    for site in sites * 3:
        both.get(site, CLASSES, 32)
    assert len(reads) == 2                   # each site read once, then served from memory

    reads.clear()
    one = SiteDataCache(max_sites=None, max_bytes=largest)
    for site in sites * 2:
        assert one.get(site, CLASSES, 32)[1]["train"] is not None
    assert len(reads) == 4                   # room for one: each turn evicts the other
    one.get(sites[1], CLASSES, 32)
    assert len(reads) == 4                   # the newest stayed
