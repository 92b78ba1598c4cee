"""A site read through a job's modality layout: DICOM series matched to the layout's channels
from headers (:mod:`client.data.matching`), each channel's pixels through its intensity handling
(:mod:`client.data.intensity`), then joined with labels, reports and splits exactly as the brain
reader does (:func:`client.data.site.join_site`).

A study's ``images`` are keyed by the layout's *input* channels (one per window of a
``ct_window`` channel), each already at model scale (the layout's intensity decided it: the
dataset does not z-score them again). A channel the study lacks is absent (the dataset
zero-fills it and marks it not present). Only pseudonymous keys leave this module: the DICOM
headers and file paths it reads stay inside it.

Geometry, 2D layouts: ``[H, W]`` images keep their source matrix here; the dataset resizes each
channel to the job's ``image_size`` (one resize, as for the brain reader). 3D layouts: each
channel is a true volume on the layout's grid ``[Z, Y, X]`` (its ``spacing``, ``size`` and one
orientation: :mod:`client.data.volume_site`); the dataset resizes that grid to the model's
``image_size`` cube (no resize when the layout's size already is that cube).
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pydicom

from .cache import FileReader, SiteCache
from .dicom import MAX_DECODED_BYTES, decoded_bytes, pseudonym, values_unvalidated
from .intensity import apply_intensity
from .layout import Channel, Layout, LayoutError, check_volume_layout
from .manifest_site import MANIFEST, decode_manifest_site, has_manifest, manifest_rows
from .matching import match_site
from .sequences import SEQUENCES
from .site import (IngestReport, SideReads, SiteData, SiteDataError, Study, check_decoded,
                   decode_site, dicom_folder, join_shares, join_site, mask_files, read_masks,
                   read_reports, read_share)
from .workers import SharedWorkers, chunks, map_shared

# Studies the layout's missing-channel policy (or a channel that failed to decode) drops.
STUDY_SKIPS = ("study_missing_channel",)


def read_site(site_dir: Path | str, layout: Layout | None,
              class_names: tuple[str, ...] | None = None, *, multi_label: bool = False,
              key: bytes | None = None, workers: int = 1,
              cache: SiteCache | None = None) -> SiteData:
    """A site read through a job's ``layout``; None (brain_mri_4seq) is the default reader
    (:func:`client.data.site.load_site`). The one place training, evaluation and
    ``medfed predict`` choose their reader. ``workers``: decode processes (every reader).
    ``cache``: the site's decoded-study cache (a deployed site's
    state dir, :mod:`client.data.cache`): the DICOM is decoded once per change of the files,
    layout or key; labels, reports, masks and splits are joined afresh on every read, so a
    changed ``labels.csv`` costs no decoding. A site with a ``manifest.csv`` is a NIfTI
    research export (:mod:`client.data.manifest_site`), read through the same layout."""
    site_dir = Path(site_dir)
    channels = SEQUENCES if layout is None else layout.input_channels
    if has_manifest(site_dir):          # a NIfTI research export (client.data.manifest_site)
        rows = manifest_rows(site_dir, layout)       # every row checked before any read
        root, paths, source = site_dir.resolve(), [site_dir.resolve() / MANIFEST], "manifest"
        paths += sorted({path for *_, path in rows})
    else:
        root, paths, source = dicom_folder(site_dir), None, "dicom"
    if cache is None:
        if source == "manifest":
            studies, report = decode_manifest_site(site_dir, layout, key=key, workers=workers)
        elif layout is None:
            studies, report = decode_site(site_dir, key=key, workers=workers)
        else:
            studies, report = decode_layout_site(site_dir, layout, key=key, workers=workers)
        masks = None
    else:
        # The cache decodes only the studies whose files changed, each on its own
        # (a manifest site: as a whole), in ``workers`` processes. The brain reader works
        # file by file: the cache reads each new file once (its study and its pixels).
        reader = FileReader(partial(read_share, key), join_shares) \
            if source == "dicom" and layout is None else None
        # The processes that decoded then read the masks and de-identify the reports: the
        # helpers start on them while this process syncs and publishes the cache.
        with SharedWorkers(workers) as pool:
            side = SideReads(site_dir, key, pool)
            studies, report = cache.decoded(root, layout, key,
                                            partial(_decode_files, source, site_dir, layout,
                                                    key, workers if source == "manifest" else 1),
                                            paths=paths, source=source,
                                            by_study=source == "dicom", reader=reader,
                                            pool=pool, meanwhile=side.start)
            check_decoded(site_dir, studies, report, None if layout is None else layout.name)
            read_masks_here, texts = side.results()
            up = pool if pool.started else None      # a hit starts no process for these
            masks = _cached_masks(site_dir, key, cache, up, read_masks_here)
            if texts is None:
                texts = read_reports(site_dir, key, up)
        return join_site(site_dir, studies, report, class_names, multi_label=multi_label,
                         channels=channels, key=key, masks=masks, texts=texts)
    return join_site(site_dir, studies, report, class_names, multi_label=multi_label,
                     channels=channels, key=key, masks=masks)


def _decode_files(source: str, site_dir: Path, layout: Layout | None, key: bytes | None,
                  workers: int, files: list[Path]) -> tuple[list[Study], IngestReport]:
    """One cache unit: the studies of ``files`` (a manifest site: the whole site, in
    ``workers`` processes; a DICOM unit is one study, decoded in one)."""
    if source == "manifest":
        return decode_manifest_site(site_dir, layout, key=key, workers=workers)
    if layout is None:
        return decode_site(site_dir, key=key, paths=files)
    return decode_layout_site(site_dir, layout, key=key, paths=files)


def _cached_masks(site_dir: Path, key: bytes | None, cache: SiteCache,
                  pool: SharedWorkers | None = None,
                  read: tuple[dict[str, np.ndarray], Counter] | None = None):
    """The site's lesion masks through the cache (decoding NIfTI masks is most of a cached
    read otherwise): a side entry keyed by ``segmentations.csv`` and the files it lists,
    each mask a one-image study. ``(masks by study key, skip counts)``. ``read``: the masks
    as :func:`read_masks` gives them, already read (:class:`SideReads`)."""
    root = site_dir.resolve()
    if not (root / "segmentations.csv").is_file():
        return {}, Counter()

    def decode():
        masks, skipped = read_masks(site_dir, key, pool) if read is None else read
        return ([Study(k, "", {"mask": m}) for k, m in masks.items()],
                IngestReport(skipped=skipped))
    studies, report = cache.side_entry("masks", root,
                                       [root / "segmentations.csv", *mask_files(site_dir)],
                                       key, decode)
    return {s.key: s.images["mask"] for s in studies}, report.skipped


def dataset_options(layout: Layout | None) -> dict:
    """``StudyDataset`` options a layout implies: its input channels, already at the scale
    its intensity chose (no z-score), in its dimensionality. None: the brain defaults."""
    if layout is None:
        return {}
    return {"sequences": layout.input_channels, "normalize": False,
            "spatial_dims": 3 if layout.dims == "3d" else 2}


def load_layout_site(site_dir: Path | str, layout: Layout,
                     class_names: tuple[str, ...] | None = None, *,
                     multi_label: bool = False, key: bytes | None = None,
                     workers: int = 1) -> SiteData:
    """Read, de-identify, join and split one site through a ``layout`` (2D or 3D), with
    pseudonyms under the site's ``key`` (:mod:`client.data.pseudonyms`), decoding in
    ``workers`` processes (:func:`decode_layout_site`).

    Labels, reports, masks and the patient-level split are those of
    :func:`client.data.site.load_site`. Skips are counted in the report by reason: the
    matcher's per-file and per-series reasons, ``pixel_decode_error``/``too_large`` per
    series, ``extra_images_in_series`` (a 2D channel takes one image of its series: the
    middle one by InstanceNumber) and ``study_missing_channel`` (a required channel, or any
    channel under ``missing: skip_study``). A 3D layout adds the volume reasons of
    :class:`client.data.volume.VolumeCounts` per series (``missing_slice``, ``gantry_tilt``,
    ``inconsistent_spacing`` ...), ``grid_too_large`` (the layout's spacing would resample the
    series beyond the readers' caps) and ``resample_error``.

    Raises
    ------
    SiteDataError
        A 3D layout without a grid or with a 2D-only intensity, a missing directory or
        ``dicom/`` folder, or nothing usable left.
    """
    site_dir = Path(site_dir)
    studies, report = decode_layout_site(site_dir, layout, key=key, workers=workers)
    return join_site(site_dir, studies, report, class_names, multi_label=multi_label,
                     channels=layout.input_channels, key=key)


def decode_layout_site(site_dir: Path, layout: Layout, *, key: bytes | None = None,
                       workers: int = 1, paths: list[Path] | None = None,
                       ) -> tuple[list[Study], IngestReport]:
    """The decode half of :func:`load_layout_site`: studies with their layout channels
    (no label, report, mask or split yet) and the read counts; a function of the files
    under ``dicom/``, the layout and ``key`` alone (what :mod:`client.data.cache` keeps).
    ``paths``: only these files (whole studies: the cache's units), and then an empty
    result is returned, not refused.

    ``workers > 1`` decodes the matched series in that many spawned processes (series
    matching reads headers only and stays in this one); the result is the same as with one.
    """
    if workers < 1:
        raise ValueError(f"decode workers must be >= 1, got {workers}")
    if layout.dims == "3d":
        try:
            check_volume_layout(layout)
        except LayoutError as err:
            raise SiteDataError(str(err)) from None
    match = match_site(layout, dicom_folder(site_dir), key=key, paths=paths)
    report = IngestReport(files=match.report.files,
                          skipped=Counter(match.report.skipped_files)
                          + Counter(match.report.skipped_series))
    plan = [(study_key, channel, match.files[assigned[channel.name]])
            for study_key, assigned in sorted(match.assignment.items())
            for channel in layout.channels if channel.name in assigned]
    reads = iter(_decode_series([(channel, files) for _, channel, files in plan], layout, key,
                                workers))
    by_study: dict[str, list] = {study_key: [] for study_key in sorted(match.assignment)}
    for (study_key, channel, _), (read, skipped, images) in zip(plan, reads):
        report.skipped.update(skipped)
        report.images += images
        by_study[study_key].append((channel, read))
    required = {c.name for c in layout.channels if c.required}
    studies = []
    for study_key, channel_reads in by_study.items():
        images: dict[str, np.ndarray] = {}
        patient_key = None
        for channel, read in channel_reads:
            if read is None:
                continue
            planes, patient_key = read[0], patient_key or read[1]
            images.update(zip(_input_names(channel), planes))
        got = {c.name for c in layout.channels if set(_input_names(c)) <= images.keys()}
        if not got or required - got or (layout.missing == "skip_study"
                                         and got != set(layout.channel_names)):
            report.skipped["study_missing_channel"] += 1
            continue
        studies.append(Study(study_key, patient_key, images))
    if paths is None:
        check_decoded(site_dir, studies, report, layout.name)
    return studies, report


SeriesRead = tuple["tuple[np.ndarray, str] | None", Counter, int]   # read, skips, images


def _decode_series(series: list[tuple[Channel, tuple[Path, ...]]], layout: Layout,
                   key: bytes | None, workers: int) -> list[SeriesRead]:
    """Each matched series through its channel, in order; in ``workers`` processes (this one
    among them: :mod:`client.data.workers`), short runs joined back in order."""
    if workers == 1:
        return _decode_chunk(series, layout, key)
    parts = map_shared(partial(_decode_chunk, layout=layout, key=key),
                       chunks(series, workers, most=8), workers)
    return [read for part in parts for read in part]


def _decode_chunk(series: list[tuple[Channel, tuple[Path, ...]]], layout: Layout,
                  key: bytes | None) -> list[SeriesRead]:
    """One worker's share: ``(read or None, skip reasons, images read)`` per series."""
    if layout.dims == "3d":
        # Imported here: resampling onto the grid uses MONAI, whose import costs seconds that
        # a 2D layout's site (and the brain reader) should not pay at start-up.
        from .volume_site import read_volume_channel
    out = []
    for channel, files in series:
        if layout.dims == "3d":
            skipped: Counter = Counter()
            read = read_volume_channel(channel, files, layout, skipped, key)
            out.append((read, skipped, int(read is not None)))
        else:
            counts = IngestReport()
            read = _read_channel(channel, files, layout.dims, counts, key)
            out.append((read, counts.skipped, counts.images))
    return out


def _input_names(channel: Channel) -> tuple[str, ...]:
    """The model inputs one channel yields (as :attr:`Layout.input_channels` names them)."""
    if channel.intensity.kind == "ct_window":
        return tuple(f"{channel.name}:{w.name}" for w in channel.intensity.windows)
    return (channel.name,)


@values_unvalidated()   # no header value (or path) in a log: the PatientID access included
def _read_channel(channel: Channel, files: tuple[Path, ...], dims: str,
                  report: IngestReport, key: bytes | None) -> tuple[np.ndarray, str] | None:
    """``([C, H, W] float32, patient key)`` of one series, or None (counted in ``report``).
    A 2D channel takes the middle image of its series by InstanceNumber (a ``2d_slice``
    layout: the middle slice of the volume); a multi-frame file, its middle frame."""
    try:
        if len(files) > 1:
            if dims == "2d":
                report.skipped["extra_images_in_series"] += len(files) - 1
            heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
            order = sorted(range(len(files)),
                           key=lambda i: (int(heads[i].get("InstanceNumber", 0) or 0), i))
            path = files[order[len(order) // 2]]
        else:
            path = files[0]
        ds = pydicom.dcmread(path)
        if decoded_bytes(ds) > MAX_DECODED_BYTES:
            report.skipped["too_large"] += 1          # never decoded
            return None
        planes = apply_intensity(channel.intensity, ds)      # [C, H, W] or [C, F, H, W]
    except Exception:  # noqa: BLE001 - truncated pixels, missing codec, colour for xray
        report.skipped["pixel_decode_error"] += 1
        return None
    if planes.ndim == 4:
        planes = planes[:, planes.shape[1] // 2]
    if planes.ndim != 3 or not np.isfinite(planes).all():
        report.skipped["pixel_decode_error"] += 1
        return None
    report.images += 1
    study_uid = str(ds.get("StudyInstanceUID", ""))
    patient_key = pseudonym("patient", str(ds.get("PatientID", "")) or study_uid, key)
    return planes.astype(np.float32), patient_key
