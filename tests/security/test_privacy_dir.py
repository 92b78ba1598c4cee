"""Attacker: whoever can write into the PACS export folder the site reads (another account, the
export service). The site's privacy dir defaults to ``<data-dir>/.medfed``: renaming it away
gives the site a fresh ledger, i.e. a fresh privacy budget. The default stays (existing sites
keep their ledgers there), but ``medfed site`` says so, loudly, once at start."""

from __future__ import annotations

import logging
import os

import pytest

from medfed.deploy.preflight import replaceable_by_others
from medfed.deploy.site import Site, SiteSettings


def _site(tmp_path, privacy_dir: str | None = None) -> Site:
    return Site(SiteSettings(site_id="a", data_dir=tmp_path / "pacs", superlink="x:1",
                             root_cert=tmp_path / "ca", auth_key=tmp_path / "k",
                             state_dir=tmp_path / "state", privacy_dir=privacy_dir))


def _warnings(site: Site, caplog) -> list[str]:
    with caplog.at_level(logging.WARNING, logger="medfed.deploy"):
        site.warn_shared_privacy_dir()
    return [r.getMessage() for r in caplog.records if r.name == "medfed.deploy"]


@pytest.mark.parametrize("mode", [0o770, 0o757, 0o775])
def test_a_ledger_in_a_data_dir_others_can_write_is_warned_about_once(tmp_path, caplog, mode):
    (tmp_path / "pacs" / ".medfed").mkdir(parents=True)
    os.chmod(tmp_path / "pacs", mode)
    (line,) = _warnings(_site(tmp_path), caplog)
    assert "reset the site's privacy budget" in line and f"mode {mode:04o}" in line
    assert str(tmp_path) not in line                   # no paths in the site's log


def test_a_relative_privacy_dir_under_a_shared_subfolder_is_warned_about(tmp_path, caplog):
    (tmp_path / "pacs" / "site" / "ledger").mkdir(parents=True)
    os.chmod(tmp_path / "pacs", 0o700)
    os.chmod(tmp_path / "pacs" / "site", 0o777)
    assert len(_warnings(_site(tmp_path, "site/ledger"), caplog)) == 1


def test_no_warning_for_an_owner_only_data_dir_or_a_privacy_dir_outside_it(tmp_path, caplog):
    (tmp_path / "pacs" / ".medfed").mkdir(parents=True)
    os.chmod(tmp_path / "pacs", 0o755)
    assert _warnings(_site(tmp_path), caplog) == []
    os.chmod(tmp_path / "pacs", 0o777)                 # shared, but the ledger is elsewhere
    (tmp_path / "ledger").mkdir()
    assert _warnings(_site(tmp_path, str(tmp_path / "ledger")), caplog) == []


def test_a_sticky_shared_folder_keeps_others_from_renaming_the_sites_entries(tmp_path):
    (tmp_path / "pacs" / ".medfed").mkdir(parents=True)
    os.chmod(tmp_path / "pacs", 0o1777)
    assert replaceable_by_others(tmp_path / "pacs" / ".medfed", tmp_path / "pacs") is None


def test_the_warning_comes_from_the_sites_start_checks(tmp_path, monkeypatch):
    """``preflight`` calls it (after the data are read), so a site starting says it."""
    import medfed.deploy.site as site_module

    calls = []
    site = _site(tmp_path)
    for name in ("check_auth_key", "check_port_free", "check_superlink"):
        monkeypatch.setattr(site_module, name, lambda *a, **k: None)
    monkeypatch.setattr(site_module, "check_data_dir", lambda *a, **k: "ok")
    monkeypatch.setattr(site_module, "pseudonym_key", lambda s: b"k")
    monkeypatch.setattr("client.data.site.dicom_folder", lambda d: d)
    monkeypatch.setattr(Site, "warn_shared_privacy_dir", lambda self: calls.append(self))
    site.preflight()
    assert calls == [site]
