"""Decode workers for the layout readers: a chest (2D) and a CT (3D) site read with two
decode processes (this one and a spawned helper) give exactly what one process gives: studies, order, arrays, counts."""

from __future__ import annotations

import dataclasses
import numpy as np
import pytest

from client.data.layout import load_layout
from client.data.layout_site import decode_layout_site
from client.data.workers import SharedWorkers

KEY = b"workers-tests-key".ljust(32, b".")


def assert_same_decode(one, two):
    (a_studies, a_report), (b_studies, b_report) = one, two
    assert [(s.key, s.patient_key, list(s.images)) for s in a_studies] == \
        [(s.key, s.patient_key, list(s.images)) for s in b_studies]
    for a, b in zip(a_studies, b_studies):
        for name in a.images:
            assert a.images[name].dtype == b.images[name].dtype
            np.testing.assert_array_equal(a.images[name], b.images[name])
    assert a_report.as_dict() == b_report.as_dict()


# ct_volume is slow: each spawned worker imports MONAI (seconds of CPU) to resample
@pytest.mark.parametrize("kind", ["chest_xray", pytest.param("ct_volume", marks=pytest.mark.slow)])
def test_two_workers_decode_what_one_does(tmp_path, kind, monkeypatch):
    if kind == "chest_xray":
        from medfed.synth.chest import synthesize_chest

        synthesize_chest(tmp_path / "data", n_sites=1, seed=5, patients=8)
        layout = load_layout(kind)
    else:
        from medfed.synth.ct import synthesize_ct

        synthesize_ct(tmp_path / "data", n_sites=1, seed=3, patients=4)
        layout = dataclasses.replace(load_layout(kind), size=(16, 16, 16),
                                     spacing=(8.0, 8.0, 8.0))
    site = tmp_path / "data" / "site-0"
    one = decode_layout_site(site, layout, key=KEY)
    assert len(one[0]) >= 2 * 2                          # enough series for two workers
    pools = []
    real_start = SharedWorkers._start

    def counted_start(self):
        pools.append(self.workers)
        real_start(self)
    monkeypatch.setattr(SharedWorkers, "_start", counted_start)
    assert_same_decode(one, decode_layout_site(site, layout, key=KEY, workers=2))
    assert pools == [2]                # two processes did the decoding: this one and a helper


def test_workers_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        decode_layout_site(tmp_path, load_layout("chest_xray"), workers=0)
