"""Attacks on a deployed site's pseudonyms: someone who knows the identifiers (the study UIDs
and patient IDs a coordinator, a referring hospital or a PACS export holds) recomputes the
site's pseudonyms or its reported manifest fingerprint, or links one patient across two
sites. Each test fails when the site's secret key is taken out of the reader."""

from __future__ import annotations

import csv
import hashlib
import multiprocessing
import os
import shutil
import stat

import pydicom
import pytest
from flwr.app import Context, RecordDict

from client.data.pseudonyms import KEY_FILE, PseudonymKeyError, pseudonym, site_key
from client.data.site import load_site
from client.runtime import SiteConfigError, SiteDataCache, resolve_site
from models import TASKS
from protocol import wire
from tests.conftest import CLASSES


def _context(node: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})


def _deployed(site_dir, **node):
    return resolve_site(_context({wire.NODE_DATA_DIR: str(site_dir)} | node))


@pytest.fixture
def site_dir(tiny_sites, tmp_path):
    """A private copy of one synthetic site without any state another test left in it."""
    return shutil.copytree(tiny_sites / "site-0", tmp_path / "site-0",
                           ignore=shutil.ignore_patterns(".medfed"))


def _identifiers(site_dir) -> tuple[set[str], set[str]]:
    """What an outsider may know of a site: every study UID and patient ID it holds."""
    studies, patients = set(), set()
    for path in (site_dir / "dicom").rglob("*"):
        if path.is_file():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            studies.add(str(ds.StudyInstanceUID))
            patients.add(str(ds.PatientID))
    return studies, patients


def _unkeyed(kind: str, value: str) -> str:
    """The pseudonym formula, as anyone reading the code can compute it without the key."""
    return hashlib.sha256(f"medfed:{kind}:{value}".encode()).hexdigest()[:16]


def _site_data(site):
    data, _ = SiteDataCache().get(site, CLASSES, 32, TASKS.build("classification", {}).data_needs)
    return data


def test_whoever_knows_the_identifiers_cannot_recompute_a_deployed_sites_pseudonyms(site_dir):
    site = _deployed(site_dir)
    data = _site_data(site)
    studies, patients = _identifiers(site_dir)
    guessed_studies = {_unkeyed("study", uid) for uid in studies}
    guessed_patients = {_unkeyed("patient", pid) for pid in patients}
    assert {s.key for s in data.studies}.isdisjoint(guessed_studies)
    assert {s.patient_key for s in data.studies}.isdisjoint(guessed_patients)
    # ... while the site itself, holding the key, joins labels by them (nothing unlabelled).
    with open(site_dir / "labels.csv") as f:
        labelled = {pseudonym("study", r["study_instance_uid"], site.pseudonym_key)
                    for r in csv.DictReader(f) if r["label"]}
    assert labelled and labelled <= {s.key for s in data.studies if s.label >= 0}


def test_the_coordinator_cannot_recompute_the_manifest_fingerprint_a_site_reports(site_dir):
    """The fingerprint (sent in every reply) hashes the pseudonyms: without the key, a
    coordinator holding the site's UIDs and labels cannot test it against a guessed cohort."""
    reported = _site_data(_deployed(site_dir)).fingerprint
    recomputed = load_site(site_dir, CLASSES).fingerprint     # the same reader, no key
    assert reported != recomputed


def test_two_sites_holding_the_same_patients_produce_unlinkable_pseudonyms(site_dir, tmp_path):
    a = _site_data(_deployed(site_dir))
    twin = shutil.copytree(site_dir, tmp_path / "twin",       # same studies, another hospital
                           ignore=shutil.ignore_patterns(".medfed"))
    b = _site_data(_deployed(twin))
    assert {s.patient_key for s in a.studies}.isdisjoint({s.patient_key for s in b.studies})
    again = _site_data(_deployed(site_dir))                   # a restart keeps its splits
    assert [(s.key, s.split) for s in again.studies] == [(s.key, s.split) for s in a.studies]


def test_the_key_is_born_private_at_the_site_and_a_loose_one_is_refused(site_dir):
    _deployed(site_dir)
    key_file = site_dir / ".medfed" / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_bytes()) == 32
    key_file.chmod(0o640)
    with pytest.raises(SiteConfigError, match="chmod 600"):
        _deployed(site_dir)
    key_file.chmod(0o600)
    key_file.write_bytes(b"short")
    with pytest.raises(SiteConfigError, match="32 bytes"):
        _deployed(site_dir)


def test_a_simulated_site_keeps_the_unkeyed_reproducible_pseudonyms(tiny_sites):
    sim = resolve_site(_context({wire.NODE_PARTITION_ID: 0}), tiny_sites)
    assert sim.simulated and sim.pseudonym_key is None
    assert "pseudonym" not in repr(_deployed(tiny_sites / "site-1"))   # never in a log line


def _key_in(folder) -> bytes:
    return site_key(folder)


def test_processes_starting_at_once_agree_on_one_key(tmp_path):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        keys = pool.map(_key_in, [tmp_path / "state"] * 8)
    assert len(set(keys)) == 1
    assert sorted(os.listdir(tmp_path / "state")) == [KEY_FILE]      # no temporary left


def test_medfed_site_creates_and_checks_the_key_before_reading_data(site_dir, tmp_path):
    from medfed.deploy.site import SiteSettings, pseudonym_key

    settings = SiteSettings(site_id="a", data_dir=site_dir, superlink="127.0.0.1:1",
                            root_cert=tmp_path / "ca.pem", auth_key=tmp_path / "k",
                            state_dir=tmp_path / "flwr")
    key = pseudonym_key(settings)
    assert key == site_key(site_dir / ".medfed")          # where the ClientApp reads it
    (site_dir / ".medfed" / KEY_FILE).chmod(0o604)
    with pytest.raises(PseudonymKeyError):
        pseudonym_key(settings)
