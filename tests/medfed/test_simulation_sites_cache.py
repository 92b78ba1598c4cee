"""``medfed simulate`` owns the simulated sites' shared decode folder (client.runtime
``SiteDataCache.for_simulation``): the ClientApp it runs uses it, and it is removed when the
simulation ends - also when the simulation fails. Flower's engine is stubbed: what is
checked is the wiring, not a run (tests/medfed/test_simulation.py runs real ones)."""

from __future__ import annotations

import shutil

import flwr.simulation
import pytest

from client.runtime import SiteDataCache
from medfed import simulation
from server.config import load_experiment

FRESH = shutil.ignore_patterns(".medfed")     # another test's deployed cache stays there


@pytest.fixture
def made(monkeypatch):
    """Every simulation cache made, kept alive here (so only an explicit close removes its
    folder, not the collection of the last reference)."""
    caches = []
    real = SiteDataCache.for_simulation.__func__

    def recorded(cls, *args, **kwargs):
        caches.append(real(cls, *args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(SiteDataCache, "for_simulation", classmethod(recorded))
    return caches


@pytest.mark.parametrize("fails", [False, True])
def test_simulate_removes_the_sites_cache_folder_when_it_ends(tiny_sites, tmp_path,
                                                              monkeypatch, made, fails):
    root = tmp_path / "data"
    for i in (0, 1):
        shutil.copytree(tiny_sites / f"site-{i}", root / f"site-{i}", ignore=FRESH)
    cfg = load_experiment(["experiment=smoke", "federation.num_sites=2",
                           "federation.num_rounds=1", "tracking.log_models=false",
                           f"data.root={root}", f"runs_dir={tmp_path / 'runs'}"])
    seen = []

    def engine(*, client_app, **_):
        seen.append([c.sim_root for c in made if c.sim_root.is_dir()])
        if fails:
            raise RuntimeError("a site's actor died")

    monkeypatch.setattr(flwr.simulation, "run_simulation", engine)
    if fails:
        with pytest.raises(RuntimeError):
            simulation.simulate(cfg, run_dir=tmp_path / "run")
    else:
        simulation.simulate(cfg, run_dir=tmp_path / "run")
    assert len(made) == 1 and len(seen) == 1 and len(seen[0]) == 1    # there while it ran
    assert made[0].sim_root is None and not seen[0][0].exists()       # gone after, forgotten
    assert not any(p.name.startswith("medfed-sim-sites-") for p in root.rglob("*"))
