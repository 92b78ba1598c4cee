"""Assign a site's DICOM series to a layout's channels from headers alone (no pixel decoded),
and count every series that no channel takes, by reason.

Reading is header-only (``stop_before_pixels=True``) and de-identifying: a file is reduced to
the attributes the rules look at (:class:`SeriesHeader`). Those include the free-text
SeriesDescription/ProtocolName, which can carry PHI, so a :class:`SeriesHeader` never leaves
the site process; only :class:`MatchReport` (counts, channel and rule names) may be printed,
logged or sent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from .dicom import pseudonym, values_unvalidated
from .layout import Channel, ChannelRule, Layout

# Skip reasons, per file (not part of an image series) and per series.
FILE_SKIPS = ("not_dicom", "unreadable", "missing_uid", "non_image")
SERIES_SKIPS = ("modality_not_in_layout", "no_rule_matched", "ambiguous",
                "inconsistent_series", "duplicate_channel")

# Objects that carry no image even when they copy an image's header (Rows/Columns): SR, key
# objects and presentation states, waveforms, encapsulated documents, RT plans/structures.
_NON_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.",
                           "1.2.840.10008.5.1.4.1.1.9.", "1.2.840.10008.5.1.4.1.1.104.",
                           "1.2.840.10008.5.1.4.1.1.481.")
_NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "DOC", "ECG", "RTPLAN", "RTSTRUCT", "RTRECORD"}


@dataclass(frozen=True)
class SeriesHeader:
    """The attributes of one file that layout rules read; site-internal (free text)."""

    study_key: str                 # pseudonyms, never the UIDs
    series_key: str
    modality: str = ""
    sop_class_uid: str = ""
    description: str = ""
    protocol: str = ""
    image_type: tuple[str, ...] = ()
    view_position: str = ""
    laterality: str = ""
    body_part: str = ""
    contrast: bool = False
    is_image: bool = True          # has an image pixel module (Rows/Columns)
    path: Path | None = field(default=None, compare=False, repr=False)   # site-internal


@dataclass(frozen=True)
class Match:
    """A series taken by a channel, through the named rule."""

    channel: str
    rule: str


@dataclass
class MatchReport:
    """Counts only: safe to print, log and send."""

    layout: str
    files: int = 0
    series: int = 0
    matched: dict[str, Counter] = field(default_factory=dict)   # channel -> rule -> series
    skipped_files: Counter = field(default_factory=Counter)
    skipped_series: Counter = field(default_factory=Counter)
    studies: int = 0                       # studies with at least one matched series
    studies_usable: int = 0                # ... that the missing-channel policy keeps
    studies_missing: Counter = field(default_factory=Counter)    # channel -> studies

    def as_dict(self) -> dict:
        return {"layout": self.layout, "files": self.files, "series": self.series,
                "matched": {c: dict(r) for c, r in self.matched.items()},
                "skipped_files": dict(self.skipped_files),
                "skipped_series": dict(self.skipped_series), "studies": self.studies,
                "studies_usable": self.studies_usable,
                "studies_missing": dict(self.studies_missing)}


@dataclass
class SiteMatch:
    """Site-internal: the assignment (study key -> channel -> series key), the files of each
    assigned series (for the pixel reader), and the report (the only part that may leave)."""

    assignment: dict[str, dict[str, str]]
    report: MatchReport
    files: dict[str, tuple[Path, ...]] = field(default_factory=dict)   # series key -> files


def header_of(ds: pydicom.Dataset, path: Path | None = None, key: bytes | None = None
              ) -> SeriesHeader | None:
    """The rule-relevant attributes of a dataset read with ``stop_before_pixels``, with
    pseudonyms under the site's ``key``; None when it has no study or series UID."""
    study_uid, series_uid = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
    if not study_uid or not series_uid:
        return None
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return SeriesHeader(
        study_key=pseudonym("study", str(study_uid), key),
        series_key=pseudonym("series", str(series_uid), key),
        modality=_text(ds, "Modality").upper(),
        sop_class_uid=_text(ds, "SOPClassUID"),
        description=_text(ds, "SeriesDescription"),
        protocol=_text(ds, "ProtocolName"),
        image_type=tuple(str(v).strip().upper() for v in image_type),
        view_position=_text(ds, "ViewPosition").upper(),
        laterality=(_text(ds, "ImageLaterality") or _text(ds, "Laterality")).upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        contrast=bool(_text(ds, "ContrastBolusAgent")),
        is_image=_is_image(ds),
        path=path,
    )


def _is_image(ds: pydicom.Dataset) -> bool:
    """Has an image pixel module and is not a non-image object (SR, RT plan, ...)."""
    sop = _text(ds, "SOPClassUID")
    if sop.startswith(_NON_IMAGE_SOP_PREFIXES) and sop != "1.2.840.10008.5.1.4.1.1.481.1":
        return False                      # ... except RT Image Storage (481.1), an image
    if _text(ds, "Modality").upper() in _NON_IMAGE_MODALITIES:
        return False
    return "Rows" in ds and "Columns" in ds


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


@values_unvalidated()       # no header value (or path) in a log: reads and accesses inside
def read_headers(dicom_dir: Path, key: bytes | None = None, paths: list[Path] | None = None
                 ) -> tuple[list[SeriesHeader], int, Counter]:
    """Headers of every regular file under ``dicom_dir`` (recursive, sorted), or of
    ``paths`` only; returns the headers, the number of files, and the per-file skip counts.
    Read in :func:`~client.data.dicom.values_unvalidated` (nothing of a header in a log)."""
    headers, skipped, files = [], Counter(), 0
    if paths is None:
        paths = [p for p in Path(dicom_dir).rglob("*") if p.is_file()]
    for path in sorted(paths):
        files += 1
        try:
            header = header_of(pydicom.dcmread(path, stop_before_pixels=True), path, key)
        except InvalidDicomError:
            skipped["not_dicom"] += 1
            continue
        except Exception:  # noqa: BLE001 - a corrupt file must never stop a site
            skipped["unreadable"] += 1
            continue
        if header is None:
            skipped["missing_uid"] += 1
            continue
        headers.append(header)
    return headers, files, skipped


def match_series(layout: Layout, header: SeriesHeader) -> Match | str:
    """The channel that takes this series, or the skip reason (``non_image`` or one of
    ``SERIES_SKIPS``)."""
    if not header.is_image:
        return "non_image"
    modalities = layout.modalities
    if modalities and header.modality not in modalities:
        return "modality_not_in_layout"
    texts = tuple(t.lower().strip() for t in (header.description, header.protocol))
    hits: list[tuple[int, int, Channel, ChannelRule]] = []
    for order, (channel, rule) in enumerate(layout.ordered_rules()):
        text_pass = _rule_pass(rule, header, texts)
        if text_pass is not None:
            hits.append((text_pass, order, channel, rule))
    if not hits:
        return "no_rule_matched"
    if layout.resolve == "unique" and len({c.name for _, _, c, _ in hits}) > 1:
        return "ambiguous"
    # first_match: the SeriesDescription pass before the ProtocolName pass, then rule order.
    _, _, channel, rule = min(hits, key=lambda h: (h[0], h[1]))
    return Match(channel.name, rule.name)


def _rule_pass(rule: ChannelRule, h: SeriesHeader, texts: tuple[str, ...]) -> int | None:
    """None when the rule does not match; else 0 (matched on SeriesDescription, or the rule
    reads no text) or 1 (matched on ProtocolName)."""
    if rule.modality and h.modality not in rule.modality:
        return None
    if rule.sop_class_uid and h.sop_class_uid not in rule.sop_class_uid:
        return None
    if rule.view_position and h.view_position not in rule.view_position:
        return None
    if rule.image_laterality and h.laterality not in rule.image_laterality:
        return None
    if rule.body_part and h.body_part not in rule.body_part:
        return None
    if rule.image_type_contains and not set(rule.image_type_contains) <= set(h.image_type):
        return None
    if rule.contrast is not None and rule.contrast != h.contrast:
        return None
    pattern = rule.pattern
    if pattern is None:
        return 0
    for i, text in enumerate(texts):
        if text and pattern.search(text):
            return i
    return None


def match_site(layout: Layout, dicom_dir: Path, *, key: bytes | None = None,
               paths: list[Path] | None = None) -> SiteMatch:
    """Read the headers under ``dicom_dir`` (or of ``paths`` only) and assign each series
    to a channel or a counted skip reason; one series per channel and study (later ones:
    ``duplicate_channel``). ``key``: the site's pseudonym secret."""
    headers, files, skipped_files = read_headers(dicom_dir, key, paths)
    return assign(layout, headers, files=files, skipped_files=skipped_files)


def assign(layout: Layout, headers: list[SeriesHeader], *, files: int = 0,
           skipped_files: Counter | None = None) -> SiteMatch:
    """Assign already-read headers (see :func:`match_site`)."""
    report = MatchReport(layout=layout.name, files=files,
                         skipped_files=Counter(skipped_files or {}),
                         matched={c: Counter() for c in layout.channel_names})
    decisions: dict[tuple[str, str], set] = {}
    paths: dict[str, list[Path]] = {}
    for h in headers:
        if not h.is_image:      # per file: an SR may even share an image series' UID
            report.skipped_files["non_image"] += 1
            continue
        decisions.setdefault((h.study_key, h.series_key), set()).add(match_series(layout, h))
        if h.path is not None:
            paths.setdefault(h.series_key, []).append(h.path)
    report.series = len(decisions)
    assignment: dict[str, dict[str, str]] = {}
    for (study, series), outcome in sorted(decisions.items()):
        if len(outcome) > 1:
            report.skipped_series["inconsistent_series"] += 1   # its files disagree
            continue
        decision = next(iter(outcome))
        if isinstance(decision, str):
            report.skipped_series[decision] += 1
            continue
        channels = assignment.setdefault(study, {})
        if decision.channel in channels:
            report.skipped_series["duplicate_channel"] += 1
            continue
        channels[decision.channel] = series
        report.matched[decision.channel][decision.rule] += 1
    report.studies = len(assignment)
    required = {c.name for c in layout.channels if c.required}
    for study, channels in assignment.items():
        missing = [c for c in layout.channel_names if c not in channels]
        report.studies_missing.update(missing)
        if required - channels.keys() or (missing and layout.missing == "skip_study"):
            continue
        report.studies_usable += 1
    taken = {series for channels in assignment.values() for series in channels.values()}
    return SiteMatch(assignment=assignment, report=report,
                     files={k: tuple(sorted(v)) for k, v in paths.items() if k in taken})
