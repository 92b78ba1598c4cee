"""Site data commands: write synthetic hospital sites (``synth``), validate one (``ingest``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def synth(args: argparse.Namespace) -> int:
    """Write ``--sites`` synthetic sites (real DICOM) and print each site's profile."""
    from medfed.synth.sites import Scenario, synthesize

    scenario = Scenario(alpha=args.alpha, patients=args.patients,
                        quantity_skew=args.quantity_skew, scanner_shift=args.scanner_shift,
                        missing_fraction=args.missing_fraction, label_fraction=args.label_fraction)
    profiles = synthesize(Path(args.out), n_sites=args.sites, seed=args.seed,
                          external=args.external, scenario=scenario)
    for p in profiles:
        mix = ", ".join(f"{x:.2f}" for x in p.class_probs)
        notes = []
        if p.missing_sequence:
            notes.append(f"{p.missing_sequence} missing in {p.missing_fraction:.0%} of studies")
        if p.label_fraction < 1:
            notes.append(f"{p.label_fraction:.0%} labelled")
        print(f"{p.name:9s} {p.n_patients:4d} patients  class mix [{mix}]  "
              f"noise {p.scanner.noise_sigma:.0f}  {'; '.join(notes)}")
    print(f"wrote {len(profiles)} sites to {args.out}")
    return 0


def ingest(args: argparse.Namespace) -> int:
    """Read a site directory as training would and print what was found (or ``--json``)."""
    from client.data.site import load_site

    if args.findings:       # multi-label: findings.csv, counted per finding
        data = load_site(Path(args.data_dir), tuple(args.findings.split(",")), multi_label=True)
    else:
        classes = tuple(args.classes.split(",")) if args.classes else None
        data = load_site(Path(args.data_dir), classes)
    report = data.report.as_dict() | {"manifest_fingerprint": data.fingerprint}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print(f"files: {report['files']}   images read: {report['images']}   "
          f"studies: {report['studies']}   fingerprint: {data.fingerprint}")
    for title, key in (("skipped files", "skipped"), ("studies per sequence", "sequences"),
                       ("studies missing a sequence", "studies_missing"),
                       ("findings" if args.findings else "labels", "labels"),
                       ("studies per split", "splits")):
        counts = report[key]
        print(f"{title}: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"))
    return 0
