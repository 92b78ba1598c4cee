"""A hospital site's data: studies joined with labels and reports, split by patient.

Layout of a site directory::

    SITE/dicom/**        DICOM files, any names, any nesting
    SITE/labels.csv      study_instance_uid,label   (empty label = unlabelled)
    SITE/findings.csv    study_instance_uid,findings   (multi-label tasks; findings joined by
                         ";", empty = none found, no row = unlabelled)
    SITE/reports.jsonl   {"study_instance_uid": ..., "text": ...}   (optional; names, dates
                         and identifiers are removed as it is read: client.data.report_deid)
    SITE/segmentations.csv  study_instance_uid,mask_file   (optional; NIfTI lesion masks,
                            paths relative to SITE, x-major as converters write them)
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from .dicom import ReadCounts, SeriesImage, pseudonym, read_directory, read_file_study
from .masks import read_nifti
from .report_deid import deidentify_report
from .sequences import SEQUENCES
from .workers import Pending, SharedWorkers, chunks

SPLITS = ("train", "val", "test")


class SiteDataError(ValueError):
    """The site directory cannot provide usable data; the message names the problem."""


@dataclass
class Study:
    """One de-identified study. ``label`` is a class index, or for multi-label studies a
    bitmask of findings, or -1 (unlabelled)."""

    key: str
    patient_key: str
    images: dict[str, np.ndarray]          # sequence -> [H, W] float32 after the LUT
    label: int = -1
    report: str | None = None
    split: str = "train"
    mask: np.ndarray | None = None         # [H, W] uint8 lesion mask (segmentation)


@dataclass
class IngestReport:
    """Counts only, so it can be printed, logged and sent without leaking anything."""

    files: int = 0
    images: int = 0
    skipped: Counter = field(default_factory=Counter)
    studies: int = 0
    sequences: Counter = field(default_factory=Counter)
    studies_missing: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)
    masks: int = 0                          # studies with a lesion mask

    def as_dict(self) -> dict:
        return {k: dict(v) if isinstance(v, Counter) else v for k, v in self.__dict__.items()}


@dataclass
class SiteData:
    studies: list[Study]
    report: IngestReport
    fingerprint: str                       # hash of the de-identified manifest, no PHI
    unlisted: frozenset[str] = frozenset()  # label names the class list left out: stays
                                            # at the site (client.queries checks them)

    def split(self, name: str, *, labelled_only: bool = False) -> list[Study]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return [s for s in self.studies if s.split == name and (s.label >= 0 or not labelled_only)]


def assign_split(patient_key: str, fractions: tuple[float, float] = (0.6, 0.2)) -> str:
    """Deterministic patient-level split: all studies of a patient land in the same split."""
    u = int(hashlib.sha256(f"split:{patient_key}".encode()).hexdigest()[:12], 16) / 16**12
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def _group(images: list[SeriesImage], report: IngestReport) -> list[Study]:
    """Group series into studies; multi-instance series become volumes (sorted by instance)."""
    by_series: dict[tuple[str, str, str], list[SeriesImage]] = {}
    patients: dict[str, str] = {}
    for image in images:
        by_series.setdefault((image.study_key, image.sequence, image.series_key), []).append(image)
        patients[image.study_key] = image.patient_key
    studies: dict[str, Study] = {}
    for (study_key, sequence, _), series in sorted(by_series.items()):
        study = studies.setdefault(study_key, Study(study_key, patients[study_key], {}))
        if sequence in study.images:
            report.skipped["duplicate_sequence"] += len(series)
            continue
        series.sort(key=lambda s: s.instance)
        pixels = [s.pixels for s in series]
        if len({p.shape for p in pixels}) != 1:
            report.skipped["inconsistent_series"] += len(series)
            continue
        study.images[sequence] = pixels[0] if len(pixels) == 1 else np.stack(pixels)
    return list(studies.values())


def _csv_rows(path: Path, columns: tuple[str, ...]):
    """Rows of a site's CSV index (none if the file is absent); refuses missing columns."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not set(columns) <= set(reader.fieldnames):
            raise SiteDataError(f"{path.name} must have columns {','.join(columns)}")
        yield from reader


def _read_labels(path: Path, class_names: tuple[str, ...] | None, report: IngestReport,
                 key: bytes | None, unlisted: dict[str, tuple[str, ...]]) -> dict:
    labels = {}
    for row in _csv_rows(path, ("study_instance_uid", "label")):
        name = (row["label"] or "").strip()
        if not name:
            continue
        if class_names is not None and name not in class_names:
            report.labels["unknown_label"] += 1
            unlisted[pseudonym("study", row["study_instance_uid"].strip(), key)] = (name,)
            continue
        labels[pseudonym("study", row["study_instance_uid"].strip(), key)] = name
    return labels


def _read_findings(path: Path, finding_names: tuple[str, ...], report: IngestReport,
                   key: bytes | None, unlisted: dict[str, tuple[str, ...]]) -> dict:
    """Multi-label studies: ``findings.csv`` rows ``study_instance_uid,findings`` with the
    findings present joined by ``;`` (an empty cell: read, nothing found). A study without a
    row is unlabelled. Labels become bitmasks (bit k = ``finding_names[k]``); a row naming an
    unknown finding is skipped and counted."""
    bit = {name: 1 << k for k, name in enumerate(finding_names)}
    labels = {}
    for row in _csv_rows(path, ("study_instance_uid", "findings")):
        names = [n.strip() for n in (row["findings"] or "").split(";") if n.strip()]
        if any(n not in bit for n in names):
            report.labels["unknown_label"] += 1
            unlisted[pseudonym("study", row["study_instance_uid"].strip(), key)] = \
                tuple(n for n in names if n not in bit)
            continue
        labels[pseudonym("study", row["study_instance_uid"].strip(), key)] = \
            sum({bit[n] for n in names})
    return labels


def read_reports(site_dir: Path, key: bytes | None, pool: SharedWorkers | None = None,
                 ) -> tuple[dict[str, str], Counter]:
    """:func:`_read_reports` of ``SITE/reports.jsonl`` with its skip counts, the lines
    de-identified in ``pool``'s processes (the site cache's first ingest: its helpers are
    up)."""
    path = site_dir / "reports.jsonl"
    if not path.exists():
        return {}, Counter()
    with open(path) as f:
        lines = f.readlines()
    if pool is None or pool.workers == 1:
        return _report_chunk(key, lines)
    texts: dict[str, str] = {}
    skipped: Counter = Counter()
    for part, part_skipped in pool.map(partial(_report_chunk, key),
                                       chunks(lines, pool.workers, most=256, least=32)):
        texts.update(part)
        skipped.update(part_skipped)
    return texts, skipped


class SideReads:
    """The site's lesion masks and reports read by the site cache's decode helpers while the
    caller finishes the cache (its sync, renames and index; :meth:`start` is the cache's
    ``meanwhile``), joined by :meth:`results`. Reads nothing unless started with helpers
    up (a cache hit starts none: the caller reads them as before)."""

    def __init__(self, site_dir: Path, key: bytes | None, pool: SharedWorkers):
        self._site_dir, self._key, self._pool = site_dir, key, pool
        self._job: Pending | None = None
        self._mask_tasks = 0
        self._failed: Exception | None = None

    def start(self) -> None:
        """Hand the masks and reports to the pool's helpers (when they are up); this
        process joins them in :meth:`results`. A bad ``segmentations.csv`` or
        ``reports.jsonl`` is raised from :meth:`results`, not here: this runs inside the
        cache's build, which it would abort (and the decoded units with it), where the
        version is to be published first and only the side read fail."""
        try:
            self._start()
        except Exception as err:  # noqa: BLE001 - re-raised by results()
            self._failed = err

    def _start(self) -> None:
        if not self._pool.started:
            return
        tasks = []
        if (self._site_dir / "segmentations.csv").is_file():
            rows = list(_csv_rows(self._site_dir / "segmentations.csv",
                                  ("study_instance_uid", "mask_file")))
            tasks += [partial(_mask_chunk, str(self._site_dir), self._key, part)
                      for part in chunks(rows, self._pool.workers, most=16)]
        self._mask_tasks = len(tasks)
        path = self._site_dir / "reports.jsonl"
        if path.exists():
            with open(path) as f:
                lines = f.readlines()
            tasks += [partial(_report_chunk, self._key, part)
                      for part in chunks(lines, self._pool.workers, most=256, least=32)]
        self._job = self._pool.submit(_call, tasks)

    def results(self) -> tuple[tuple[dict[str, np.ndarray], Counter] | None,
                               tuple[dict[str, str], Counter] | None]:
        """``(masks, their skips)`` and ``(report texts, their skips)`` as
        :func:`read_masks` and :func:`read_reports` give them; None for what was not read
        here (not started, or the site has no ``segmentations.csv``).

        Raises
        ------
        SiteDataError, OSError, UnicodeDecodeError
            What reading ``segmentations.csv`` or ``reports.jsonl`` raised in :meth:`start`.
        """
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        if self._job is None:
            return None, None
        parts, self._job = self._job.map(), None
        masks, texts = None, ({}, Counter())     # no reports.jsonl: as read_reports gives
        if self._mask_tasks:
            masks = ({}, Counter())
            for part, skipped in parts[:self._mask_tasks]:
                masks[0].update(part)
                masks[1].update(skipped)
        for part, skipped in parts[self._mask_tasks:]:
            texts[0].update(part)
            texts[1].update(skipped)
        return masks, texts


def _call(task: Callable[[], object]) -> object:
    """Run one task of :class:`SideReads` (a ``functools.partial``)."""
    return task()


def _report_chunk(key: bytes | None, lines: list[str]) -> tuple[dict[str, str], Counter]:
    report = IngestReport()
    return _read_reports(None, report, key, lines), report.skipped


def _read_reports(path: Path | None, report: IngestReport, key: bytes | None,
                  lines: list[str] | None = None) -> dict[str, str]:
    """De-identified report texts by pseudonymous study key (the raw text goes no further);
    ``lines``: these lines instead of the file's."""
    if lines is None:
        if not path.exists():
            return {}
        with open(path) as f:
            lines = f.readlines()
    texts = {}
    for line in lines:
        try:
            row = json.loads(line)
            text, _ = deidentify_report(str(row["text"]))
            texts[pseudonym("study", str(row["study_instance_uid"]), key)] = text
        except (ValueError, KeyError, TypeError):
            report.skipped["bad_report_line"] += 1
    return texts


def mask_files(site_dir: Path) -> list[Path]:
    """The mask files ``segmentations.csv`` lists that exist inside the site (resolved)."""
    out = []
    for row in _csv_rows(site_dir / "segmentations.csv", ("study_instance_uid", "mask_file")):
        path = (site_dir / row["mask_file"].strip()).resolve()
        if site_dir.resolve() in path.parents and path.is_file():
            out.append(path)
    return out


def read_masks(site_dir: Path, key: bytes | None, pool: SharedWorkers | None = None,
               ) -> tuple[dict[str, np.ndarray], Counter]:
    """Lesion masks by pseudonymous study key, and the skip counts of the unusable rows;
    read in ``pool``'s processes when given."""
    if pool is None or pool.workers == 1:
        return _mask_chunk(str(site_dir), key, None)
    rows = list(_csv_rows(site_dir / "segmentations.csv", ("study_instance_uid", "mask_file")))
    masks: dict[str, np.ndarray] = {}
    skipped: Counter = Counter()
    for part, part_skipped in pool.map(partial(_mask_chunk, str(site_dir), key),
                                       chunks(rows, pool.workers, most=16)):
        masks.update(part)
        skipped.update(part_skipped)
    return masks, skipped


def _mask_chunk(site_dir: str, key: bytes | None, rows: list[dict] | None,
                ) -> tuple[dict[str, np.ndarray], Counter]:
    report = IngestReport()
    return _read_masks(Path(site_dir), report, key, rows), report.skipped


def _read_masks(site_dir: Path, report: IngestReport, key: bytes | None,
                rows: list[dict] | None = None) -> dict[str, np.ndarray]:
    """Lesion masks by pseudonymous study key; unreadable entries are counted, not fatal.
    ``rows``: these rows of ``segmentations.csv`` (default: all)."""
    if rows is None:
        rows = _csv_rows(site_dir / "segmentations.csv", ("study_instance_uid", "mask_file"))
    masks = {}
    for row in rows:
        path = (site_dir / row["mask_file"].strip()).resolve()
        if site_dir.resolve() not in path.parents or not path.is_file():
            report.skipped["missing_mask_file"] += 1
            continue
        try:
            data = read_nifti(path)
        except Exception:  # noqa: BLE001 - any unreadable file is counted, never fatal
            report.skipped["unreadable_mask"] += 1
            continue
        data = data[..., data.shape[-1] // 2] if data.ndim == 3 else data
        masks[pseudonym("study", row["study_instance_uid"].strip(), key)] = \
            (data.T > 0).astype(np.uint8)
    return masks


def dicom_folder(site_dir: Path) -> Path:
    """``SITE/dicom``, refusing a site directory that lacks it."""
    if not site_dir.is_dir():
        raise SiteDataError(f"data directory {site_dir} does not exist")
    dicom_dir = site_dir / "dicom"
    if not dicom_dir.is_dir():
        raise SiteDataError(f"data directory {site_dir} has no dicom/ folder")
    return dicom_dir


def load_site(site_dir: Path | str, class_names: tuple[str, ...] | None = None, *,
              multi_label: bool = False, key: bytes | None = None,
              workers: int = 1) -> SiteData:
    """Read, de-identify, join and split one site (the brain_mri_4seq reader; a job's other
    layouts are read by :func:`client.data.layout_site.load_layout_site`). Identifiers
    become pseudonyms under the site's ``key`` (:mod:`client.data.pseudonyms`); ``workers``
    decode processes (:func:`client.data.dicom.read_directory`).

    Labels come from ``labels.csv`` (one class name per study, index into ``class_names``) or,
    with ``multi_label``, from ``findings.csv`` (bitmasks over ``class_names``, see
    ``_read_findings``).

    Raises
    ------
    SiteDataError
        If the directory is missing, has no ``dicom/`` folder, or nothing usable is left.
    """
    site_dir = Path(site_dir)
    studies, report = decode_site(site_dir, key=key, workers=workers)
    return join_site(site_dir, studies, report, class_names, multi_label=multi_label, key=key)


def decode_site(site_dir: Path, *, key: bytes | None = None, workers: int = 1,
                paths: list[Path] | None = None) -> tuple[list[Study], IngestReport]:
    """The decode half of :func:`load_site`: the site's DICOM as de-identified studies
    (images only: no label, report, mask or split yet) and the read counts. A function of
    the files under ``dicom/`` and ``key`` alone, which is what the site cache
    (:mod:`client.data.cache`) keeps. ``paths``: only these files (whole studies; the
    cache's units), and then an empty result is returned, not refused."""
    dicom_dir = dicom_folder(site_dir)
    images, counts = read_directory(dicom_dir, key=key, workers=workers, paths=paths)
    report = IngestReport(files=counts.files, images=counts.images, skipped=counts.skipped)
    studies = _group(images, report)
    if paths is None:
        check_decoded(site_dir, studies, report)
    return studies, report


# One file's share of a cache unit (client.data.cache.FileReader): its image without the
# pixels, or the reason it was skipped; the pixels travel apart (written to disk by the
# process that read them, not pickled back).
Share = tuple["SeriesImage | None", "str | None"]


def read_share(key: bytes | None, path: str) -> tuple[str, Share, list[np.ndarray]]:
    """One DICOM file read once for the site cache: ``(its StudyInstanceUID, its share,
    its arrays)``; :func:`join_shares` of a study's shares is :func:`decode_site` of its
    files. The UID stays at the site (the cache keeps a keyed hash of it)."""
    counts = ReadCounts()
    image, uid = read_file_study(Path(path), counts, key)
    if image is None:
        [reason] = counts.skipped
        return uid, (None, reason), []
    pixels, image.pixels = image.pixels, None
    return uid, (image, None), [pixels]


def join_shares(shares: list[tuple[Share, list[np.ndarray]]]) -> tuple[list[Study], IngestReport]:
    """The studies and read counts of files read by :func:`read_share` (in path order, as
    :func:`decode_site` reads them), exactly what :func:`decode_site` gives for them."""
    report = IngestReport(files=len(shares))
    images = []
    for (image, reason), arrays in shares:
        if image is None:
            report.skipped[reason] += 1
        else:           # a copy: the share outlives the unit (the caller keeps it)
            images.append(replace(image, pixels=arrays[0]))
    report.images = len(images)
    return _group(images, report), report


def check_decoded(site_dir: Path, studies: list[Study], report: IngestReport,
                  layout_name: str | None = None) -> None:
    """Refuse a whole site's decode that found no files or no usable study."""
    if report.files == 0:
        raise SiteDataError(f"data directory {site_dir} is empty: no files under dicom/")
    if not studies:
        where = "" if layout_name is None else f" for layout {layout_name!r}"
        raise SiteDataError(f"no usable studies in {site_dir}{where}: {report.files} files, "
                            f"skipped {dict(report.skipped)}")


def join_site(site_dir: Path, studies: list[Study], report: IngestReport,
              class_names: tuple[str, ...] | None, *, multi_label: bool = False,
              channels: tuple[str, ...] = SEQUENCES, key: bytes | None = None,
              masks: tuple[dict[str, np.ndarray], Counter] | None = None,
              texts: tuple[dict[str, str], Counter] | None = None) -> SiteData:
    """Join read studies with the site's labels, reports and masks, split them by patient,
    count them per input ``channels`` and fingerprint the de-identified manifest. Every
    reader (today's sequences, a layout's channels) ends here, so all label the same way.
    ``key`` must be the pseudonym secret the reader used: labels, reports and masks are
    joined by pseudonyms of the same study UIDs. ``masks``: the lesion masks and their
    skip counts as :func:`read_masks` gives them, when already read (the site cache);
    ``texts``: the reports as :func:`read_reports` gives them, likewise."""
    unlisted: dict[str, tuple[str, ...]] = {}   # study -> its labels class_names leaves out
    if multi_label:
        if not class_names:
            raise SiteDataError("multi-label studies need the finding names (class_names)")
        findings = _read_findings(site_dir / "findings.csv", class_names, report, key,
                                  unlisted)
    else:
        labels = _read_labels(site_dir / "labels.csv", class_names, report, key, unlisted)
    if texts is None:
        texts = _read_reports(site_dir / "reports.jsonl", report, key)
    else:                                   # read before (in the cache's processes)
        texts, report_skips = texts
        report.skipped.update(report_skips)
    if masks is None:
        masks = _read_masks(site_dir, report, key)
    else:                                   # read before (the site cache): add its skips
        masks, mask_skips = masks
        report.skipped.update(mask_skips)
    index = {name: i for i, name in enumerate(class_names)} if class_names else None
    for study in studies:
        if multi_label:
            study.label = findings.get(study.key, -1)
            found = [n for k, n in enumerate(class_names) if study.label >= 0 and study.label >> k & 1]
            for name in found or ["unlabelled" if study.label < 0 else "no_finding"]:
                report.labels[name] += 1
        else:
            name = labels.get(study.key)
            study.label = -1 if name is None or index is None else index[name]
            report.labels[name if name is not None else "unlabelled"] += 1
        study.report = texts.get(study.key)
        study.mask = masks.get(study.key)
        report.masks += study.mask is not None
        study.split = assign_split(study.patient_key)
        report.splits[study.split] += 1
        for seq in channels:
            if seq in study.images:
                report.sequences[seq] += 1
            else:
                report.studies_missing[seq] += 1
    report.studies = len(studies)
    manifest = "\n".join(sorted(f"{s.key}:{','.join(sorted(s.images))}:{s.label}" for s in studies))
    fingerprint = hashlib.sha256(manifest.encode()).hexdigest()[:16]
    # names a job's class list leaves out, of studies the site holds (not a stale row's)
    held = {study.key for study in studies}
    left_out = frozenset(n for k, names in unlisted.items() if k in held for n in names)
    return SiteData(studies, report, fingerprint, left_out)
