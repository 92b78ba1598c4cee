"""Series-to-channel matching from headers: every series ends in a channel or a counted skip
reason, on hand-made headers, on a synthetic site, and on every file of pydicom's and
pydicom-data's own test corpora for every shipped layout."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from client.data.intensity import apply_intensity
from client.data.layout import Layout, load_layout, shipped_layouts
from client.data.matching import (FILE_SKIPS, SERIES_SKIPS, Match, SeriesHeader, assign, header_of,
                                  match_series, match_site)
from client.data.suggest import suggest_layout, to_yaml


def _h(series="r1", study="s1", **kw) -> SeriesHeader:
    return SeriesHeader(study_key=study, series_key=series, **kw)


def test_mammography_views_by_position_and_laterality():
    layout = load_layout("mammography")
    for view in ("CC", "MLO"):
        for side in ("L", "R"):
            h = _h(modality="MG", view_position=view, laterality=side)
            assert match_series(layout, h) == Match(f"{side}_{view}",
                                                    f"{'left' if side == 'L' else 'right'}_"
                                                    f"{view.lower()}")
    assert match_series(layout, _h(modality="MG", view_position="CC")) == "no_rule_matched"
    assert match_series(layout, _h(modality="CT")) == "modality_not_in_layout"
    assert match_series(layout, _h(modality="MG", view_position="CC", laterality="L",
                                   is_image=False)) == "non_image"


def test_overlapping_rules_are_ambiguous_unless_first_match():
    raw = {"name": "overlap", "channels": [
        {"name": "any_mr", "rules": [{"modality": "MR"}]},
        {"name": "t2", "rules": [{"modality": "MR", "description": "t2"}]}]}
    h = _h(modality="MR", description="AX T2")
    assert match_series(Layout.from_dict(raw), h) == "ambiguous"
    first = Layout.from_dict(raw | {"resolve": "first_match", "match_order": ["t2", "any_mr"]})
    assert match_series(first, h) == Match("t2", "t2#0")
    assert match_series(first, _h(modality="MR", description="dwi")) == Match("any_mr",
                                                                             "any_mr#0")


def test_rule_conditions_image_type_contrast_sop_class_body_part():
    raw = {"name": "c", "channels": [
        {"name": "post", "rules": [{"modality": "MR", "contrast": True,
                                    "image_type_contains": ["ORIGINAL"]}]},
        {"name": "ct", "rules": [{"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                                  "body_part": ["HEAD", "BRAIN"]}]}]}
    layout = Layout.from_dict(raw)
    assert match_series(layout, _h(modality="MR", contrast=True,
                                   image_type=("ORIGINAL", "PRIMARY"))).channel == "post"
    assert match_series(layout, _h(modality="MR", contrast=False,
                                   image_type=("ORIGINAL",))) == "no_rule_matched"
    assert match_series(layout, _h(modality="MR", contrast=True,
                                   image_type=("DERIVED",))) == "no_rule_matched"
    assert match_series(layout, _h(sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                   body_part="HEAD")).channel == "ct"
    assert match_series(layout, _h(sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                   body_part="CHEST")) == "no_rule_matched"


def test_assignment_counts_duplicates_inconsistent_series_and_missing_channels():
    layout = load_layout("chest_xray")
    pa = dict(modality="CR", view_position="PA", body_part="CHEST")
    headers = [
        _h("a", "s1", **pa), _h("a", "s1", **pa),                  # two files, one series
        _h("b", "s1", **pa),                                       # second frontal: duplicate
        _h("c", "s1", modality="DX", view_position="LL", body_part="CHEST"),
        _h("d", "s2", modality="CR", view_position="LL", body_part="CHEST"),   # no frontal
        _h("e", "s3", **pa), _h("e", "s3", modality="CR", view_position="LL",
                                body_part="CHEST"),                # files disagree
        _h("f", "s4", modality="CT"),
    ]
    report = assign(layout, headers, files=9, skipped_files=Counter(not_dicom=1)).report
    assert report.series == 6
    assert report.matched == {"frontal": Counter(frontal_view=1),
                              "lateral": Counter(lateral_view=2)}
    assert report.skipped_series == Counter(duplicate_channel=1, inconsistent_series=1,
                                            modality_not_in_layout=1)
    assert report.studies == 2 and report.studies_usable == 1    # s2 lacks the required view
    assert report.studies_missing == Counter(frontal=1)
    assert sum(map(sum, (c.values() for c in report.matched.values()))) + \
        sum(report.skipped_series.values()) == report.series


def test_brain_layout_on_a_synthetic_site_agrees_with_todays_reader(tiny_sites):
    from client.data.site import load_site

    site = tiny_sites / "site-1"
    matched = match_site(load_layout("brain_mri_4seq"), site / "dicom")
    report = matched.report
    # The pixel reader gets every file of every assigned series (and no other).
    assigned = {s for channels in matched.assignment.values() for s in channels.values()}
    assert set(matched.files) == assigned
    assert sum(map(len, matched.files.values())) == \
        report.files - sum(report.skipped_files.values())
    assert all(p.is_relative_to(site / "dicom") for fs in matched.files.values() for p in fs)
    today = load_site(site, None).report
    per_channel = {c: sum(r.values()) for c, r in report.matched.items()}
    assert per_channel == {c: today.sequences.get(c, 0) for c in per_channel}
    assert report.studies == today.studies
    for reason in ("not_dicom", "non_image"):        # the site's OS litter and dose report
        assert report.skipped_files[reason] == today.skipped[reason] == 1
    assert not report.skipped_series


def _corpus_files() -> list[Path]:
    """Every file of the installed test corpora (listed on disk: nothing is downloaded)."""
    import data_store   # pydicom-data's package

    roots = [Path(pydicom.data.__file__).parent / "test_files",
             Path(data_store.__file__).parent / "data"]
    files = sorted(p for root in roots for p in root.rglob("*") if p.is_file())
    assert len(files) > 200
    return files


@pytest.mark.parametrize("name", shipped_layouts())
def test_every_corpus_file_is_matched_or_skipped_with_a_reason(name, tmp_path):
    layout = load_layout(name)
    files = _corpus_files()
    # One directory holding links to both corpora, so one match_site call sees every file.
    for i, path in enumerate(files):
        os.symlink(path, tmp_path / f"{i:04d}_{path.name}")
    report = match_site(layout, tmp_path).report
    assert report.files == len(files)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        headers = [_header_or_none(p) for p in files]
    images = sum(1 for h in headers if h is not None and h.is_image)
    assert sum(report.skipped_files.values()) == len(files) - images
    matched = sum(sum(c.values()) for c in report.matched.values())
    assert matched + sum(report.skipped_series.values()) == report.series > 0
    assert set(report.skipped_series) <= set(SERIES_SKIPS)
    assert set(report.skipped_files) <= set(FILE_SKIPS)
    expected_hits = {"brain_mri_4seq": 1, "chest_xray": 1, "ct_volume": 1, "mammography": 0}
    assert matched >= expected_hits[name]


def _header_or_none(path: Path):
    try:
        return header_of(pydicom.dcmread(path, stop_before_pixels=True))
    except Exception:  # noqa: BLE001 - the count of unreadable files is what we compare
        return None


@pytest.mark.parametrize("name", ["chest_xray", "ct_volume"])
def test_every_matched_corpus_file_decodes_or_lacks_a_decoder(name):
    """What a layout takes from the corpora goes through its intensity function: values in
    [0, 1], one output per window; a failure only where pydicom has no decoder for the
    transfer syntax (counted as pixel_decode_error by the reader)."""
    from pydicom.pixels import get_decoder

    layout = load_layout(name)
    channels = {c.name: c for c in layout.channels}
    decoded, no_decoder = 0, 0
    for path in _corpus_files():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = _header_or_none(path)
            if header is None or not isinstance(m := match_series(layout, header), Match):
                continue
            ds = pydicom.dcmread(path)
            if not get_decoder(ds.file_meta.TransferSyntaxUID).is_available:
                no_decoder += 1
                continue
            out = apply_intensity(channels[m.channel].intensity, ds)
        assert out.shape[0] == channels[m.channel].intensity.n_outputs
        assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
        decoded += 1
    assert decoded >= {"chest_xray": 2, "ct_volume": 10}[name]


def test_suggested_layout_loads_and_suppresses_rare_descriptions():
    headers = [_h(f"t1-{i}", f"s{i}", modality="MR", description="AX T1 SE") for i in range(6)]
    headers += [_h(f"t2-{i}", f"s{i}", modality="MR", description="ax t2 fse ") for i in range(5)]
    headers += [_h("rare", "s0", modality="MR", description="Doe^John 1970")]
    headers += [_h(f"ct-{i}", f"c{i}", modality="CT", description=f"scan {i}") for i in range(3)]
    headers += [_h("sr", "s0", modality="SR", is_image=False)]
    raw, counts = suggest_layout(headers)
    layout = Layout.from_dict(raw)
    assert layout.channel_names == ("ct", "mr_ax_t1_se", "mr_ax_t2_fse")
    assert counts == {"series": {"MR": 12, "CT": 3}, "suppressed": {"CT": 3, "MR": 1},
                      "min_series": 5}
    text = to_yaml(raw, counts)
    for secret in ("doe", "john", "1970", "scan 0"):
        assert secret not in text.lower()
    assert Layout.from_dict(yaml.safe_load(text)) == layout
    # The proposal takes the series it was made from; the rare one falls to no rule.
    report = assign(layout, headers).report
    assert report.matched["mr_ax_t1_se"] == Counter({"mr_ax_t1_se#0": 6})
    assert report.matched["ct"] == Counter({"ct#0": 3})
    assert report.skipped_series == Counter(no_rule_matched=1)
    assert report.skipped_files == Counter(non_image=1)
