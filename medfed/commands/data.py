"""Site data commands: write synthetic hospital sites (``synth``), validate one (``ingest``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def synth(args: argparse.Namespace) -> int:
    """Write ``--sites`` synthetic sites (real DICOM) and print each site's profile."""
    from medfed.synth.sites import Scenario, synthesize

    if getattr(args, "layout", "brain_mri_4seq") == "chest_xray":
        return _synth_chest(args)
    if getattr(args, "layout", "brain_mri_4seq") == "ct_volume":
        return _synth_ct(args)

    scenario = Scenario(alpha=args.alpha, patients=args.patients,
                        quantity_skew=args.quantity_skew, scanner_shift=args.scanner_shift,
                        missing_fraction=args.missing_fraction, label_fraction=args.label_fraction)
    profiles = synthesize(Path(args.out), n_sites=args.sites, seed=args.seed,
                          external=args.external, scenario=scenario)

    def notes(p) -> str:
        parts = [f"{p.missing_sequence} missing in {p.missing_fraction:.0%} of studies"] \
            if p.missing_sequence else []
        return f"noise {p.scanner.noise_sigma:.0f}  {'; '.join(parts + _labelled(p))}"

    return _print_sites(profiles, notes, "sites", args.out)


def _synth_chest(args: argparse.Namespace) -> int:
    """``--layout chest_xray``: radiology departments instead of brain-MRI sites."""
    from medfed.synth.chest import synthesize_chest

    return _synth_layout(args, synthesize_chest, _chest_notes, "chest_xray sites")


def _synth_ct(args: argparse.Namespace) -> int:
    """``--layout ct_volume``: CT departments writing DICOM series (task=ct3)."""
    from medfed.synth.ct import synthesize_ct

    return _synth_layout(args, synthesize_ct, _ct_notes, "ct_volume sites")


def _synth_layout(args: argparse.Namespace, synthesize: Callable[..., list],
                  notes: Callable[[Any], str], what: str) -> int:
    """The chest and CT generators take the same arguments; only their notes differ."""
    profiles = synthesize(Path(args.out), n_sites=args.sites, seed=args.seed, alpha=args.alpha,
                          patients=args.patients, external=args.external,
                          label_fraction=args.label_fraction)
    return _print_sites(profiles, notes, what, args.out)


def _chest_notes(p) -> str:
    return "; ".join([f"{p.modality} {p.photometric}", f"{p.rows}px", f"AP {p.ap_fraction:.0%}",
                      f"lateral {p.lateral_fraction:.0%}", *_labelled(p)])


def _ct_notes(p) -> str:
    z, y, x = p.shape
    return "; ".join([f"{z}x{y}x{x} at {p.thickness:g}/{p.pixel_mm:g} mm",
                      "enhanced multi-frame" if p.enhanced else "single-frame, shuffled",
                      "oblique" if any(p.angles_deg) else "axial", f"noise {p.noise:.0f} HU",
                      *_labelled(p)])


def _labelled(profile) -> list[str]:
    """The note for a site that labels only part of its studies."""
    return [f"{profile.label_fraction:.0%} labelled"] if profile.label_fraction < 1 else []


def _print_sites(profiles: list, notes: Callable[[Any], str], what: str, out: str) -> int:
    """One line per written site (size, class mix, what sets it apart), then a summary line."""
    for p in profiles:
        mix = ", ".join(f"{x:.2f}" for x in p.class_probs)
        print(f"{p.name:9s} {p.n_patients:4d} patients  class mix [{mix}]  {notes(p)}")
    print(f"wrote {len(profiles)} {what} to {out}")
    return 0


def ingest(args: argparse.Namespace) -> int:
    """Read a site directory as training would and print what was found (or ``--json``)."""
    from client.data.site import load_site

    if getattr(args, "layout", None) or getattr(args, "suggest_layout", False):
        return _ingest_layout(args)
    if args.findings:       # multi-label: findings.csv, counted per finding
        data = load_site(Path(args.data_dir), tuple(args.findings.split(",")), multi_label=True)
    else:
        classes = tuple(args.classes.split(",")) if args.classes else None
        data = load_site(Path(args.data_dir), classes)
    report = data.report.as_dict() | {"manifest_fingerprint": data.fingerprint}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print(f"layout: brain_mri_4seq (the default; --layout NAME|FILE for another)   "
          f"files: {report['files']}   images read: {report['images']}   "
          f"studies: {report['studies']}   fingerprint: {data.fingerprint}")
    for title, key in (("skipped files", "skipped"), ("studies per sequence", "sequences"),
                       ("studies missing a sequence", "studies_missing"),
                       ("findings" if args.findings else "labels", "labels"),
                       ("studies per split", "splits")):
        counts = report[key]
        print(f"{title}: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"))
    return 0


def _ingest_layout(args: argparse.Namespace) -> int:
    """``--layout``: per channel, series matched by each rule, and skips by reason;
    ``--suggest-layout``: a proposed layout YAML. Counts and rule names only."""
    from client.data.manifest_site import has_manifest
    from client.data.matching import assign, read_headers
    from client.data.suggest import suggest_layout, to_yaml

    site = Path(args.data_dir)
    if not site.is_dir():
        raise ValueError("ingest: --data-dir is not a directory")
    layout = None if args.suggest_layout else _checked_layout(args.layout)
    if has_manifest(site):      # a NIfTI/NRRD research export: its manifest names channels
        if args.suggest_layout:
            raise ValueError("ingest: a research export's manifest.csv names each file's "
                             "channel itself; check it with --layout NAME|FILE")
        return _ingest_manifest(args, site, layout)
    # A site directory keeps its DICOM under dicom/; any other directory is read as is.
    dicom_dir = site / "dicom" if (site / "dicom").is_dir() else site
    if args.suggest_layout:
        headers, _, _ = read_headers(dicom_dir)
        layout, counts = suggest_layout(headers)
        if not layout["channels"]:
            raise ValueError("ingest: no image series found; nothing to propose")
        print(json.dumps({"layout": layout, "counts": counts}, indent=2) if args.json
              else to_yaml(layout, counts), end="" if not args.json else "\n")
        return 0
    headers, files, skipped = read_headers(dicom_dir)
    report = assign(layout, headers, files=files, skipped_files=skipped).report
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
        return _usable(report.studies_usable, report.layout)
    print(f"layout: {report.layout}   files: {report.files}   series: {report.series}   "
          f"studies: {report.studies} ({report.studies_usable} usable)")
    for channel, rules in report.matched.items():
        total = sum(rules.values())
        detail = ", ".join(f"{r}={n}" for r, n in sorted(rules.items()))
        print(f"  {channel}: {total} series" + (f" ({detail})" if detail else ""))
    for title, counts in (("skipped files", report.skipped_files),
                          ("skipped series", report.skipped_series),
                          ("studies missing a channel", report.studies_missing)):
        print(f"{title}: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                              or "none"))
    return _usable(report.studies_usable, report.layout)


def _checked_layout(name: str):
    """The layout as a run takes it: its schema, and a 3D layout's grid and volume
    intensities (the rule config load and each site apply; a LayoutError, one line)."""
    from client.data.layout import load_layout
    from protocol.layout import check_volume_layout

    layout = load_layout(name)
    if layout.dims == "3d":
        check_volume_layout(layout)
    return layout


def _usable(studies: int, layout: str) -> int:
    """Exit 0 when some study is usable; otherwise refuse (after the counts were printed)."""
    if not studies:
        raise ValueError(f"ingest: no usable study for layout {layout!r} (the counts above "
                         "say what was skipped and why)")
    return 0


def _ingest_manifest(args: argparse.Namespace, site: Path, layout) -> int:
    """``--layout`` on a research export (``manifest.csv``): read as training reads it;
    studies, skips by reason and splits (counts only)."""
    from client.data.layout_site import read_site

    report = read_site(site, layout).report.as_dict()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(f"layout: {layout.name}   manifest.csv   files: {report['files']}   "
              f"studies: {report['studies']}")
        for title, key in (("skipped", "skipped"), ("studies per split", "splits")):
            print(f"{title}: " + (", ".join(f"{k}={v}" for k, v in sorted(report[key].items()))
                                  or "none"))
    return _usable(report["studies"], layout.name)
