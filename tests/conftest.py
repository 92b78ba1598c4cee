"""Shared fixtures: small synthetic sites, one torch thread, offline everything."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from pathlib import Path  # noqa: E402

import pydicom  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

CLASSES = ("high_grade_glioma", "low_grade_glioma", "cyst")
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber",
            "ReferringPhysicianName")


def fixed_pseudonym_key(state_dir: Path, name: str) -> None:
    """Write the fixed pseudonym key of site ``name`` into a site's state folder (0600), the
    key :func:`_fixed_pseudonym_keys` gives that site's data directory: a deployed site whose
    privacy dir is elsewhere then splits its patients as every other test does."""
    import hashlib

    from client.data.pseudonyms import KEY_FILE

    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = state_dir / KEY_FILE
    key.write_bytes(hashlib.sha256(f"medfed-tests/{name}".encode()).digest())
    key.chmod(0o600)


def _fixed_pseudonym_keys(root: Path) -> Path:
    """Give every site a fixed pseudonym key, so tests that read a site as deployed (keyed)
    see the same splits on every run: a fresh random key reshuffles patients, and a 16-patient
    site then sometimes draws an empty validation split (CI, stop 30)."""
    for site in sorted(p for p in root.iterdir() if p.is_dir()):
        fixed_pseudonym_key(site / ".medfed", site.name)
    return root


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory) -> Path:
    """Two small synthetic sites (~16 patients each) written once per session."""
    from medfed.synth.sites import synthesize

    root = tmp_path_factory.mktemp("sites") / "data"
    synthesize(root, n_sites=2, seed=7, patients=16)
    return _fixed_pseudonym_keys(root)


@pytest.fixture(scope="session")
def three_sites(tmp_path_factory) -> Path:
    """Three very small synthetic sites for multi-strategy simulations."""
    from medfed.synth.sites import synthesize

    root = tmp_path_factory.mktemp("sites3") / "data"
    synthesize(root, n_sites=3, seed=3, patients=12)
    return _fixed_pseudonym_keys(root)


def final_weights(run_dir: Path) -> dict:
    """Global weights of the newest checkpoint in a run directory."""
    from server.checkpoint import latest_weights

    return latest_weights(run_dir)


def kill_after_checkpoint(cmd: list[str], runs: Path, round_: int, env: dict) -> Path:
    """Start ``cmd`` (a ``medfed simulate`` run writing under ``runs``) in its own process
    group, SIGKILL the whole group once round ``round_``'s checkpoint exists; its run dir."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600       # a hang guard, not a timing assertion
    try:
        while time.monotonic() < deadline:
            ckpts = list(runs.glob(f"*/checkpoints/round-{round_:04d}"))
            if ckpts or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert ckpts, f"round {round_} checkpoint never appeared"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)            # the server and its Ray workers
        proc.wait(timeout=60)
    return ckpts[0].parent.parent


def phi_strings(root: Path) -> set[str]:
    """Every PHI value the generator wrote into DICOM tags under ``root`` (plus name parts)."""
    found: set[str] = set()
    for path in root.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - truncated junk files are part of the fixture
            continue
        for tag in PHI_TAGS:
            value = str(ds.get(tag, "")).strip()
            if not value:
                continue
            found.add(value)
            found.update(part for part in value.replace("^", " ").split() if len(part) >= 6)
    return found


@pytest.fixture
def task_identity(monkeypatch):
    """What Flower's process sets before an app runs (messages are stamped with it), for
    tests that call a ClientApp or build messages outside Flower."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 3), ("_run_id", 1), ("_node_id", 7)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def meta_builds_only(monkeypatch):
    """A job's model may be built on the meta device only (a site sizing it); a real build
    raises - inside a ClientApp, the site's generic error. For attacks whose model, built
    for real, would be the allocation under test."""
    from protocol.job import JobSpec

    real = JobSpec.build

    def build(self, **kwargs):
        if torch.get_default_device().type != "meta":
            raise AssertionError("the job's model was built for real")
        return real(self, **kwargs)
    monkeypatch.setattr(JobSpec, "build", build)


def pytest_collection_modifyitems(config, items):
    """Files with the most slow tests first, in a stable order: ``make test`` hands whole files
    to two workers as they free up, so a long file left for last would run alone (xdist's own
    reordering, by number of tests, put a one-test, three-minute file at the very end)."""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.fspath.strpath] = slow.get(item.fspath.strpath, 0) + \
            (item.get_closest_marker("slow") is not None)
    first_seen = {path: i for i, path in reversed(list(enumerate(
        item.fspath.strpath for item in items)))}
    items.sort(key=lambda item: (-slow[item.fspath.strpath], first_seen[item.fspath.strpath]))
