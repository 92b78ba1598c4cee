"""``medfed ingest --layout`` / ``--suggest-layout``: counts and rule names only (no PHI, no
paths, no descriptions), a user's YAML loads, a broken one fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from client.data.layout import Layout
from medfed.cli import main
from medfed.synth.sites import SERIES_NAMING
from tests.conftest import phi_strings


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_nothing_identifying(text: str, site: Path) -> None:
    for secret in phi_strings(site):
        assert secret not in text
    assert str(site) not in text and ".dcm" not in text
    for naming in SERIES_NAMING:                   # free-text series descriptions
        for description in naming.values():
            if " " in description or "_" in description:   # not a bare channel name
                assert description not in text


def test_ingest_layout_prints_per_channel_rule_counts_and_skips(tiny_sites, capsys):
    site = tiny_sites / "site-1"
    code, out, _ = _run(capsys, "ingest", "--layout", "brain_mri_4seq", "--data-dir", str(site))
    assert code == 0
    assert "layout: brain_mri_4seq" in out
    assert "FLAIR: " in out and "(flair=" in out and "T1ce: " in out
    assert "skipped files: non_image=1, not_dicom=1" in out
    _assert_nothing_identifying(out, site)
    code, out, _ = _run(capsys, "ingest", "--layout", "brain_mri_4seq", "--data-dir", str(site),
                        "--json")
    report = json.loads(out)
    assert report["matched"]["T1"] == {"t1": report["studies"]}
    _assert_nothing_identifying(out, site)


def test_ingest_layout_on_a_real_radiograph_directory(capsys):
    import data_store

    corpus = Path(data_store.__file__).parent / "data"
    code, out, _ = _run(capsys, "ingest", "--layout", "chest_xray", "--data-dir", str(corpus))
    assert code == 0
    assert "frontal: 1 series (frontal_view=1)" in out      # RG1's transfer-syntax variants
    assert "modality_not_in_layout=" in out


def test_ingest_accepts_a_user_layout_file(tiny_sites, tmp_path, capsys):
    path = tmp_path / "two_seq.yaml"
    path.write_text(yaml.safe_dump({"name": "two_seq", "channels": [
        {"name": "flair", "rules": [{"description": "flair|tirm"}]},
        {"name": "t2", "rules": [{"description": "t2"}]}],
        "resolve": "first_match", "match_order": ["flair", "t2"]}))
    code, out, _ = _run(capsys, "ingest", "--layout", str(path), "--data-dir",
                        str(tiny_sites / "site-0"))
    assert code == 0 and "layout: two_seq" in out and "no_rule_matched=" in out


def test_ingest_refuses_a_broken_layout_in_one_line(tiny_sites, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nchannels:\n  - name: a\n    rules: [{modality: CR, "
                    "laterality: L}]\n")
    code, out, err = _run(capsys, "ingest", "--layout", str(path), "--data-dir",
                          str(tiny_sites / "site-0"))
    assert code == 2 and not out
    assert err.count("\n") == 1 and "unknown key 'laterality'" in err and "image_laterality" in err


def test_suggest_layout_proposes_a_loadable_layout_without_phi(tiny_sites, capsys):
    site = tiny_sites / "site-0"
    code, out, _ = _run(capsys, "ingest", "--suggest-layout", "--data-dir", str(site))
    assert code == 0
    layout = Layout.from_dict(yaml.safe_load(out))
    assert len(layout.channels) >= 4                       # the site's four MR sequences
    assert "descriptions seen in fewer than 5 series are not shown" in out
    for secret in phi_strings(site):
        assert secret not in out
    assert str(site) not in out
    # What the site writes rarely (its one dose report, an SR) is never shown.
    assert "dose" not in out.lower()


def _corpus_dirs() -> list[Path]:
    """pydicom's own test files and pydicom-data's, as installed (nothing downloaded)."""
    import data_store
    import pydicom.data

    return [Path(pydicom.data.__file__).parent / "test_files",
            Path(data_store.__file__).parent / "data"]


def test_every_shipped_layout_ingests_both_corpora_through_the_cli(capsys):
    from client.data.layout import shipped_layouts

    for directory in _corpus_dirs():
        files = sum(1 for p in directory.rglob("*") if p.is_file())
        for name in shipped_layouts():
            code, out, err = _run(capsys, "ingest", "--layout", name, "--data-dir",
                                  str(directory), "--json")
            r = json.loads(out)     # the counts, always; exit 2 when none is usable
            assert (code, err == "") == ((0, True) if r["studies_usable"] else (2, False))
            assert r["files"] == files
            matched = sum(sum(rules.values()) for rules in r["matched"].values())
            assert matched + sum(r["skipped_series"].values()) == r["series"]
        code, out, _ = _run(capsys, "ingest", "--suggest-layout", "--data-dir", str(directory))
        assert code == 0 and Layout.from_dict(yaml.safe_load(out))


def test_a_research_export_is_ingested_through_its_manifest(tmp_path, capsys):
    """``--layout`` on a NIfTI research export reads its ``manifest.csv`` as training does
    (it read no DICOM there and reported 0 usable with exit 0); a layout it cannot serve is
    refused in one line."""
    from tests.client.test_manifest_site import site as make_site

    root = make_site.__wrapped__(tmp_path)
    assert main(["ingest", "--data-dir", str(root), "--layout", "brain_mri_4seq"]) == 0
    out = capsys.readouterr().out
    assert "manifest.csv" in out and "studies: 3" in out and "RESEARCH" not in out
    assert main(["ingest", "--data-dir", str(root), "--suggest-layout"]) == 2
    assert "names each file's channel itself" in capsys.readouterr().err
    assert main(["ingest", "--data-dir", str(root), "--layout", "chest_xray"]) == 2
    assert capsys.readouterr().err.count("\n") == 1      # X-ray intensities need DICOM


def test_no_usable_study_for_a_layout_exits_non_zero_after_the_counts(tiny_sites, capsys):
    assert main(["ingest", "--data-dir", str(tiny_sites / "site-0"), "--layout",
                 "chest_xray"]) == 2
    captured = capsys.readouterr()
    assert "studies:" in captured.out and captured.err.count("\n") == 1
    assert "no usable study for layout 'chest_xray'" in captured.err


def test_a_3d_layout_a_run_would_refuse_is_refused_by_ingest_too(tiny_sites, tmp_path, capsys):
    """A 3D layout without a grid passed ``ingest`` and was refused only at config load;
    ingest applies the same volume rule now (one line)."""
    from client.data.layout import LAYOUT_DIR

    text = (LAYOUT_DIR / "ct_volume.yaml").read_text()
    no_grid = tmp_path / "v3.yaml"
    no_grid.write_text("\n".join(line for line in text.splitlines()
                                 if not line.startswith(("size:", "spacing:"))) + "\n")
    code, out, err = _run(capsys, "ingest", "--data-dir", str(tiny_sites / "site-0"),
                          "--layout", str(no_grid))
    assert code == 2 and out == "" and err.count("\n") == 1 and "size" in err
