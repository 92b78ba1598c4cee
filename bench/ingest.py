"""First ingest of a site vs reading the same files with bare pydicom, side by side in one run.

Three arms over the same synthetic site (real DICOM from ``medfed synth``, PACS junk included),
interleaved ``--repeats`` times so load from other processes falls on all alike:

- ``pydicom``: ``pydicom.dcmread`` + ``pixel_array`` per file, nothing else (failures skipped);
- ``reader``: the site's reader, :func:`client.data.dicom.read_directory` (checks, size caps,
  modality LUT, keyed pseudonyms, counted skips), one process;
- ``reader_2w``: the same with two decode workers (node config ``decode-workers``).

The figure is studies/s (median of the repeats); ``ingest_ratio_vs_pydicom`` is the two-worker
reader's over bare pydicom (the issue's goal: >= 0.8). The site cache and its numbers
(``cache_load_seconds_5000``, ``peak_rss_gb_5000``) are not built yet: null, with the reason.

    python -m bench.ingest [--patients 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from .common import update_results_md, write_result

GOAL_RATIO = 0.8
NOT_BUILT = "not measured: the site's preprocessed-tensor cache is not built yet (issue 23 item 4)"


def bare_pydicom(files: list[Path]) -> int:
    import pydicom

    decoded = 0
    for path in files:
        try:
            pydicom.dcmread(path).pixel_array
            decoded += 1
        except Exception:  # noqa: BLE001 - junk files: skipped, as a site would
            pass
    return decoded


def main(argv: list[str] | None = None, *, write: bool = True) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from client.data.dicom import read_directory
    from medfed.synth.sites import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        synthesize(root, n_sites=1, seed=0, patients=args.patients)
        dicom = root / "site-0" / "dicom"
        files = sorted(p for p in dicom.rglob("*") if p.is_file())
        key = b"bench-key-".ljust(32, b".")
        arms = {"pydicom": lambda: bare_pydicom(files),
                "reader": lambda: read_directory(dicom, key=key),
                "reader_2w": lambda: read_directory(dicom, key=key, workers=2)}
        seconds: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(args.repeats):
            for name, arm in arms.items():
                start = time.perf_counter()
                arm()
                seconds[name].append(time.perf_counter() - start)
        images, counts = read_directory(dicom, key=key)
        studies = len({image.study_key for image in images})

    median = {name: statistics.median(s) for name, s in seconds.items()}
    rate = {name: studies / s for name, s in median.items()}
    ratio = rate["reader_2w"] / rate["pydicom"]
    payload = {
        "ingest_ratio_vs_pydicom": round(ratio, 3),
        "ingest_ratio_vs_pydicom_one_worker": round(rate["reader"] / rate["pydicom"], 3),
        "cache_load_seconds_5000": None,
        "peak_rss_gb_5000": None,
        "not_measured": {"cache_load_seconds_5000": NOT_BUILT, "peak_rss_gb_5000": NOT_BUILT},
        "goal": {"ingest_ratio_vs_pydicom": f">= {GOAL_RATIO} with two workers"},
        "details": {"studies": studies, "files": len(files), "images": counts.images,
                    "skipped": dict(counts.skipped), "repeats": args.repeats,
                    "load_average_1min": round(os.getloadavg()[0], 2),
                    "studies_per_second": {k: round(v, 1) for k, v in rate.items()},
                    "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()}},
    }
    path = write_result("ingest", payload) if write else None
    met = "met" if ratio >= GOAL_RATIO else f"NOT met, short by {GOAL_RATIO - ratio:.2f}"
    print("studies/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rate.items()))
    print(f"ingest_ratio_vs_pydicom (2 workers): {ratio:.2f}x (goal >= {GOAL_RATIO}: {met})"
          + (f"; wrote {path}" if path else ""))
    if not write:
        return payload
    update_results_md(
        "ingest",
        f"| ingest | first ingest with 2 decode workers vs bare `pydicom.dcmread`+`pixel_array`: "
        f"**{ratio:.2f}x** studies/s (goal >= {GOAL_RATIO}: {met}); one worker "
        f"{payload['ingest_ratio_vs_pydicom_one_worker']:.2f}x; cache load and peak RSS at "
        f"5,000 studies not measured (site cache not built) | {studies} synthetic brain studies, "
        f"{len(files)} files, median of {args.repeats} interleaved runs | "
        f"`bench/results/ingest.json` |")
    return payload


if __name__ == "__main__":
    main()
