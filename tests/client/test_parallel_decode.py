"""Decoding in worker processes gives exactly what one process gives: the same images in
the same order, the same pseudonyms, the same skip counts (junk files included)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.data.dicom import read_directory
from client.data.site import load_site
from client.runtime import SiteConfigError, resolve_site
from protocol import wire
from tests.conftest import CLASSES


def test_workers_read_the_same_images_in_the_same_order(tiny_sites):
    dicom = tiny_sites / "site-1" / "dicom"        # holds the PACS junk (SR, truncated, ...)
    one, counts_one = read_directory(dicom, key=b"k" * 32)
    two, counts_two = read_directory(dicom, key=b"k" * 32, workers=2)
    assert (counts_two.files, counts_two.images, counts_two.skipped) == \
        (counts_one.files, counts_one.images, counts_one.skipped)
    assert counts_one.skipped and len(one) == counts_one.images > 10
    for a, b in zip(one, two, strict=True):
        assert (a.study_key, a.patient_key, a.series_key, a.sequence, a.instance) == \
            (b.study_key, b.patient_key, b.series_key, b.sequence, b.instance)
        np.testing.assert_array_equal(a.pixels, b.pixels)


def test_a_site_read_with_workers_has_the_same_fingerprint_and_splits(tiny_sites):
    one = load_site(tiny_sites / "site-0", CLASSES)
    two = load_site(tiny_sites / "site-0", CLASSES, workers=2)
    assert two.fingerprint == one.fingerprint
    assert [(s.key, s.split) for s in two.studies] == [(s.key, s.split) for s in one.studies]


@pytest.mark.parametrize("bad", [0, -1, 65, "2", 1.5, True])
def test_decode_workers_in_node_config_must_be_a_small_positive_integer(tiny_sites, bad):
    node = {wire.NODE_PARTITION_ID: 0, wire.NODE_DECODE_WORKERS: bad}
    with pytest.raises(SiteConfigError, match="decode-workers"):
        resolve_site(Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                             run_config={}), tiny_sites)
