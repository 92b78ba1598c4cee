"""Propose a layout for a site from the Modality x SeriesDescription histogram of its series.

SeriesDescription is free text a technologist typed; rare values can carry PHI (a name, a
date, an accession number). A description becomes a rule only when at least
``MIN_SERIES`` series share it (a protocol, not a person); rarer ones are only counted. The
proposal is a starting point for a human to edit, never applied automatically.
"""

from __future__ import annotations

import re
from collections import Counter

import yaml

from .layout import Layout
from .matching import SeriesHeader

MIN_SERIES = 5      # a description shared by fewer series is suppressed (counted, never shown)

_INTENSITY = {"MR": "zscore", "CR": "xray", "DX": "xray", "MG": "xray", "RF": "xray",
              "XA": "xray", "US": "us_grey"}
_CT = {"kind": "ct_window", "windows": [{"name": "soft_tissue", "center": 40, "width": 400},
                                         {"name": "lung", "center": -600, "width": 1500},
                                         {"name": "bone", "center": 400, "width": 1800}]}


def suggest_layout(headers: list[SeriesHeader], *, name: str = "site_suggested",
                   min_series: int = MIN_SERIES) -> tuple[dict, dict]:
    """A layout (as a dict :meth:`Layout.from_dict` accepts) and the counts behind it.

    Returns
    -------
    layout : dict
        One channel per (modality, description) shared by ``min_series`` or more series, or
        one per modality where no description is that common.
    counts : dict
        ``series`` per modality, and ``suppressed`` series per modality whose description
        was rarer than ``min_series`` (or empty); counts only.
    """
    series: dict[str, SeriesHeader] = {}
    for h in headers:
        if h.is_image:
            series.setdefault(h.series_key, h)
    histogram = Counter((h.modality or "OT", h.description.lower().strip())
                        for h in series.values())
    per_modality = Counter()
    for (modality, _), n in histogram.items():
        per_modality[modality] += n
    channels, suppressed, names = [], Counter(), set()
    for modality in sorted(per_modality):
        common = sorted(d for (m, d), n in histogram.items()
                        if m == modality and d and n >= min_series)
        suppressed[modality] = per_modality[modality] - sum(histogram[modality, d]
                                                            for d in common)
        intensity = _CT if modality == "CT" else _INTENSITY.get(modality, "zscore")
        if not common:
            channels.append({"name": _unique(modality.lower(), names),
                             "rules": [{"modality": modality}], "intensity": intensity})
            continue
        for d in common:
            channels.append({"name": _unique(_slug(f"{modality}_{d}"), names),
                             "rules": [{"modality": modality,
                                        "description": f"^{re.escape(d)}$"}],
                             "intensity": intensity})
    volumetric = {"CT", "MR", "PT", "NM"} & set(per_modality)
    layout = {"name": name, "dims": "2d_slice" if volumetric else "2d", "size": None,
              "spacing": None, "missing": "allow", "resolve": "unique", "channels": channels}
    if channels:
        Layout.from_dict(layout)          # what we propose must load
    return layout, {"series": dict(per_modality), "suppressed": dict(suppressed),
                    "min_series": min_series}


def to_yaml(layout: dict, counts: dict) -> str:
    """The proposal as a commented YAML file (counts in the comments, no description)."""
    lines = [f"# Proposed from {sum(counts['series'].values())} image series; descriptions "
             f"seen in fewer than {counts['min_series']} series are not shown."]
    for modality, n in sorted(counts["series"].items()):
        lines.append(f"#   {modality}: {n} series, {counts['suppressed'].get(modality, 0)} "
                     "with a rare or empty description")
    return "\n".join(lines) + "\n" + yaml.safe_dump(layout, sort_keys=False, width=100)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48] or "channel"


def _unique(base: str, taken: set[str]) -> str:
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name
