"""Modality layouts: which series of a study become which input channel, and how their pixels
become intensities. A layout is data (YAML under ``conf/data/layout/`` or a user's own file),
validated once by :meth:`Layout.from_dict` into frozen dataclasses; nothing here reads DICOM
or files. The schema lives in ``protocol/`` because both sides check it: the server when it
composes an experiment, the site when a job carries a layout (:meth:`Layout.to_dict` is the
form that travels; the site re-validates it, the layout being data, never code or paths).
Reading layout files is the site's and CLI's (:mod:`client.data.layout`).

Matching semantics (used by :mod:`client.data.matching`):

- A :class:`ChannelRule` matches a series when *every* condition it names holds (an AND);
  a :class:`Channel` selects a series when *any* of its rules matches (an OR).
- ``description`` is a regular expression *searched* in the lower-cased, stripped
  SeriesDescription, and when that does not match, in the ProtocolName (empty texts never
  match) -- exactly how :func:`client.data.sequences.sequence_of` has always read them.
- ``resolve: first_match``: channels are tried in ``match_order`` (default: channel order),
  each channel's rules in file order, the whole SeriesDescription pass before the
  ProtocolName pass, and the first hit wins (order matters: a FLAIR is also a "T2"). The
  channel order itself is the model's input order and need not be the match order.
  ``resolve: unique`` (default): a series that rules of two channels select is ``ambiguous``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

DIMS = ("2d", "2d_slice", "3d")
INTENSITY_KINDS = ("zscore", "ct_window", "xray", "us_grey")
MISSING_POLICIES = ("allow", "skip_study")
RESOLVE_POLICIES = ("unique", "first_match")
VOLUME_INTENSITIES = ("ct_window", "zscore")     # what a 3D (cross-sectional) channel may use
# Orientation of a 3D layout's grid [Z, Y, X]: towards superior, posterior, left (nibabel/MONAI
# axis codes), i.e. an axial DICOM series as stored. Sites resample to it; served versions say it.
VOLUME_AXCODES = "SPL"
# The layout the sites read without being told (client/data/sequences.py): a job for it
# carries no layout, so the demo's job record and weights stay what they were.
DEFAULT_LAYOUT = "brain_mri_4seq"
# Caps on a model grid, checked wherever a layout or an image size is decoded (the coordinator
# at config load, each site on every job): a grid is a number the coordinator sends, and a site
# allocates it per study. 4096 is the DICOM readers' cap on rows and columns; 2**27 voxels is
# 512 MiB of float32 per channel and window (a 512^3 CT grid, a 4096^2 mammogram).
MAX_GRID_AXIS = 4096
MAX_GRID_VOXELS = 2**27

_RULE_KEYS = ("name", "modality", "sop_class_uid", "description", "image_type_contains",
              "view_position", "image_laterality", "body_part", "contrast")
_CHANNEL_KEYS = ("name", "rules", "intensity", "required")
_INTENSITY_KEYS = ("kind", "windows")
_WINDOW_KEYS = ("name", "center", "width")
_LAYOUT_KEYS = ("name", "dims", "channels", "size", "spacing", "missing", "resolve",
                "match_order", "report")


class LayoutError(ValueError):
    """A layout file is invalid; the message names the layout, the key and the fix."""


@dataclass(frozen=True)
class ChannelRule:
    """Conditions over DICOM attributes; all named ones must hold (unnamed ones are free).

    Parameters
    ----------
    modality, sop_class_uid, view_position, image_laterality, body_part : tuple of str
        The attribute must equal one of these (upper-case compare, except the UID).
    description : str or None
        Regex searched in lower-cased SeriesDescription, then ProtocolName.
    image_type_contains : tuple of str
        Each value must be one of the ImageType values (e.g. ``ORIGINAL``, ``DERIVED``).
    contrast : bool or None
        True: ContrastBolusAgent is present and not empty; False: it is absent or empty.
    """

    name: str
    modality: tuple[str, ...] = ()
    sop_class_uid: tuple[str, ...] = ()
    description: str | None = None
    image_type_contains: tuple[str, ...] = ()
    view_position: tuple[str, ...] = ()
    image_laterality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    contrast: bool | None = None

    @property
    def pattern(self) -> re.Pattern[str] | None:
        return re.compile(self.description) if self.description is not None else None


@dataclass(frozen=True)
class Window:
    """A CT display window in Hounsfield units; maps ``[center - width/2, center + width/2]``
    to ``[0, 1]``."""

    name: str
    center: float
    width: float


@dataclass(frozen=True)
class Intensity:
    """How a channel's pixels become model input: ``zscore`` (MR), ``ct_window`` (one output
    channel per window), ``xray`` (VOI LUT, MONOCHROME1 inverted), ``us_grey`` (palette/RGB
    to grey)."""

    kind: str = "zscore"
    windows: tuple[Window, ...] = ()

    @property
    def n_outputs(self) -> int:
        return len(self.windows) if self.kind == "ct_window" else 1


@dataclass(frozen=True)
class Channel:
    """One input of a study: the rules that select its series and its intensity handling."""

    name: str
    rules: tuple[ChannelRule, ...]
    intensity: Intensity = field(default_factory=Intensity)
    required: bool = False                 # a study without it is skipped (counted)


@dataclass(frozen=True)
class Layout:
    """A study's input channels and their geometry.

    Parameters
    ----------
    name : str
    channels : tuple of Channel
    dims : str
        ``2d`` (one image), ``2d_slice`` (a slice of a volume), ``3d`` (the volume).
    size : tuple of int or None
        Target size per spatial axis (2 for 2d layouts, 3 for 3d); None keeps the source.
    spacing : tuple of float or None
        Target spacing in mm per spatial axis; None keeps the source.
    missing : str
        ``allow``: a study missing an optional channel is kept; ``skip_study``: skipped.
    resolve : str
        ``unique`` or ``first_match`` (see the module docstring).
    match_order : tuple of str
        Channel names in the order ``first_match`` tries them (all of them, once each).
    report : bool
        Studies carry a free-text report (``reports.jsonl``) beside the images.
    """

    name: str
    channels: tuple[Channel, ...]
    dims: str = "2d"
    size: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    missing: str = "allow"
    resolve: str = "unique"
    match_order: tuple[str, ...] = ()
    report: bool = False

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.channels)

    def ordered_rules(self) -> tuple[tuple[Channel, ChannelRule], ...]:
        """(channel, rule) pairs in the order matching tries them."""
        by_name = {c.name: c for c in self.channels}
        order = self.match_order or self.channel_names
        return tuple((by_name[n], r) for n in order for r in by_name[n].rules)

    @property
    def input_channels(self) -> tuple[str, ...]:
        """Model input channels in order: one per window for a ``ct_window`` channel."""
        names: list[str] = []
        for c in self.channels:
            if c.intensity.kind == "ct_window":
                names.extend(f"{c.name}:{w.name}" for w in c.intensity.windows)
            else:
                names.append(c.name)
        return tuple(names)

    @property
    def modalities(self) -> frozenset[str]:
        """Modalities any rule names; empty when some rule accepts every modality."""
        out: set[str] = set()
        for c in self.channels:
            for r in c.rules:
                if not r.modality:
                    return frozenset()
                out.update(r.modality)
        return frozenset(out)

    def to_dict(self) -> dict[str, Any]:
        """The plain form :meth:`from_dict` reads back to an equal layout (JSON-safe): what a
        job carries. Defaults are written out, so the form does not depend on them."""
        def rule(r: ChannelRule) -> dict[str, Any]:
            out: dict[str, Any] = {"name": r.name}
            for key in ("modality", "sop_class_uid", "image_type_contains", "view_position",
                        "image_laterality", "body_part"):
                if getattr(r, key):
                    out[key] = list(getattr(r, key))
            if r.description is not None:
                out["description"] = r.description
            if r.contrast is not None:
                out["contrast"] = r.contrast
            return out

        def intensity(i: Intensity) -> dict[str, Any]:
            out: dict[str, Any] = {"kind": i.kind}
            if i.kind == "ct_window":
                out["windows"] = [{"name": w.name, "center": w.center, "width": w.width}
                                  for w in i.windows]
            return out

        return {"name": self.name, "dims": self.dims,
                "size": list(self.size) if self.size is not None else None,
                "spacing": list(self.spacing) if self.spacing is not None else None,
                "missing": self.missing, "resolve": self.resolve,
                **({"match_order": list(self.match_order)} if self.match_order else {}),
                "report": self.report,
                "channels": [{"name": c.name, "rules": [rule(r) for r in c.rules],
                              "intensity": intensity(c.intensity), "required": c.required}
                             for c in self.channels]}

    def selection(self) -> dict[str, Any]:
        """What decides which of a site's files and texts are read: the rules, channel names,
        dimensionality and the missing / resolve / report policies - :meth:`to_dict` without
        the preprocessing (target size, spacing, intensity), which an experiment may set."""
        out = self.to_dict()
        del out["size"], out["spacing"]
        for channel in out["channels"]:
            del channel["intensity"]
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Layout:
        """Validate a layout read from YAML.

        Raises
        ------
        LayoutError
            One message for the first problem: an unknown key (listing the known ones), an
            unknown dims/kind/policy, a window with width <= 0, a channel without rules or a
            rule with no condition (it could select every series, or none), a duplicate
            channel name, a regex that does not compile.
        """
        if not isinstance(raw, Mapping):
            raise LayoutError(f"a layout must be a mapping, got {type(raw).__name__}")
        name = str(raw.get("name") or "<unnamed>")
        where = f"layout {name!r}"
        _known(raw, _LAYOUT_KEYS, where)
        if "name" not in raw:
            raise LayoutError(f"{where}: 'name' is required")
        dims = _choice(raw.get("dims", "2d"), DIMS, f"{where}: dims")
        channels_raw = raw.get("channels")
        if not isinstance(channels_raw, list) or not channels_raw:
            raise LayoutError(f"{where}: 'channels' must be a non-empty list")
        channels = tuple(_channel(c, i, where) for i, c in enumerate(channels_raw))
        seen: set[str] = set()
        for c in channels:
            if c.name in seen:
                raise LayoutError(f"{where}: duplicate channel name {c.name!r}")
            seen.add(c.name)
        order = raw.get("match_order")
        if order is not None:
            if not isinstance(order, list) or sorted(map(str, order)) != sorted(seen):
                raise LayoutError(f"{where}: match_order must list every channel once "
                                  f"({', '.join(sorted(seen))}), got {order!r}")
            order = tuple(map(str, order))
        n_axes = 3 if dims == "3d" else 2
        size = _axes(raw.get("size"), n_axes, int, f"{where}: size")
        if size is not None:
            check_grid_size(size, f"{where}: size")
        return cls(name=name, channels=channels, dims=dims, size=size,
                   spacing=_axes(raw.get("spacing"), n_axes, float, f"{where}: spacing"),
                   missing=_choice(raw.get("missing", "allow"), MISSING_POLICIES,
                                   f"{where}: missing"),
                   resolve=_choice(raw.get("resolve", "unique"), RESOLVE_POLICIES,
                                   f"{where}: resolve"),
                   match_order=order or (),
                   report=_bool(raw.get("report", False), f"{where}: report"))


def check_grid_size(size: tuple[int, ...], where: str) -> None:
    """Refuse a grid over :data:`MAX_GRID_AXIS` on any axis or :data:`MAX_GRID_VOXELS` in all.

    Raises
    ------
    LayoutError
        Naming the size and the cap it exceeds.
    """
    voxels = 1
    for n in size:
        voxels *= n
    if max(size) > MAX_GRID_AXIS or voxels > MAX_GRID_VOXELS:
        raise LayoutError(f"{where}: {list(size)} is over the cap of {MAX_GRID_AXIS} per axis "
                          f"and {MAX_GRID_VOXELS} voxels in all")


def check_volume_layout(layout: Layout) -> None:
    """A 3D layout can be trained: a grid (``size`` and ``spacing``, ``[Z, Y, X]``) and only
    cross-sectional intensities. The coordinator checks it at config load and each site
    again before reading.

    Raises
    ------
    LayoutError
        Saying what to add or change.
    """
    missing = [key for key in ("size", "spacing") if getattr(layout, key) is None]
    if missing:
        raise LayoutError(f"3D layout {layout.name!r} needs {' and '.join(missing)} ([Z, Y, X]):"
                          " the grid every volume is resampled onto")
    bad = [c.name for c in layout.channels if c.intensity.kind not in VOLUME_INTENSITIES]
    if bad:
        raise LayoutError(f"3D layout {layout.name!r}: channels {bad} use an intensity for 2D "
                          f"projection images; a volume takes one of {VOLUME_INTENSITIES}")


def _known(raw: Mapping, keys: tuple[str, ...], where: str) -> None:
    for key in raw:
        if key not in keys:
            raise LayoutError(f"{where}: unknown key {key!r}; known: {', '.join(keys)}")


def _choice(value: Any, options: tuple[str, ...], where: str) -> str:
    if value not in options:
        raise LayoutError(f"{where}: {value!r} is not one of {', '.join(options)}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise LayoutError(f"{where}: expected true or false, got {value!r}")
    return value


def _axes(value: Any, n: int, kind: type, where: str) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * n
    allowed = (int,) if kind is int else (int, float)      # a size of 224.5 is a typo
    if not isinstance(value, list) or len(value) != n or \
            not all(isinstance(v, allowed) and not isinstance(v, bool) and math.isfinite(v)
                    and v > 0 for v in value):
        raise LayoutError(f"{where}: expected {n} positive {kind.__name__}s (or one for all "
                          f"axes), got {value!r}")
    return tuple(kind(v) for v in value)


def _strings(value: Any, where: str, *, upper: bool = True) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise LayoutError(f"{where}: expected a string or a list of strings, got {value!r}")
    if not value:
        raise LayoutError(f"{where}: an empty list selects no series")
    return tuple(v.strip().upper() if upper else v.strip() for v in value)


def _channel(raw: Any, index: int, where: str) -> Channel:
    if not isinstance(raw, Mapping) or not raw.get("name"):
        raise LayoutError(f"{where}: channel {index} must be a mapping with a 'name'")
    name = str(raw["name"])
    where = f"{where}, channel {name!r}"
    _known(raw, _CHANNEL_KEYS, where)
    rules_raw = raw.get("rules")
    if not isinstance(rules_raw, list) or not rules_raw:
        raise LayoutError(f"{where}: 'rules' must be a non-empty list (no rule can select "
                          "a series for this channel)")
    rules = tuple(_rule(r, f"{name}#{i}", where) for i, r in enumerate(rules_raw))
    return Channel(name=name, rules=rules, intensity=_intensity(raw.get("intensity"), where),
                   required=_bool(raw.get("required", False), f"{where}: required"))


def _rule(raw: Any, default_name: str, where: str) -> ChannelRule:
    if not isinstance(raw, Mapping):
        raise LayoutError(f"{where}: a rule must be a mapping of conditions, got {raw!r}")
    _known(raw, _RULE_KEYS, f"{where}, rule {default_name}")
    where = f"{where}, rule {raw.get('name', default_name)!r}"
    if not set(raw) - {"name"}:
        raise LayoutError(f"{where}: a rule needs at least one condition "
                          f"({', '.join(_RULE_KEYS[1:])}); an empty rule would select "
                          "every series")
    kw: dict[str, Any] = {"name": str(raw.get("name", default_name))}
    for key in ("modality", "view_position", "image_laterality", "body_part",
                "image_type_contains"):
        if key in raw:
            kw[key] = _strings(raw[key], f"{where}: {key}")
    if "sop_class_uid" in raw:
        kw["sop_class_uid"] = _strings(raw["sop_class_uid"], f"{where}: sop_class_uid",
                                       upper=False)
    if "description" in raw:
        pattern = raw["description"]
        if not isinstance(pattern, str) or not pattern:
            raise LayoutError(f"{where}: description must be a non-empty regex string")
        try:
            re.compile(pattern)
        except re.error as err:
            raise LayoutError(f"{where}: description {pattern!r} is not a valid regex "
                              f"({err})") from None
        kw["description"] = pattern
    if "contrast" in raw:
        kw["contrast"] = _bool(raw["contrast"], f"{where}: contrast")
    return ChannelRule(**kw)


def _intensity(raw: Any, where: str) -> Intensity:
    if raw is None:
        return Intensity()
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, Mapping):
        raise LayoutError(f"{where}: intensity must be a kind name or a mapping")
    where = f"{where}: intensity"
    _known(raw, _INTENSITY_KEYS, where)
    kind = _choice(raw.get("kind", "zscore"), INTENSITY_KINDS, f"{where}.kind")
    windows_raw = raw.get("windows")
    if kind != "ct_window":
        if windows_raw is not None:
            raise LayoutError(f"{where}: windows are only for kind ct_window, not {kind!r}")
        return Intensity(kind=kind)
    if not isinstance(windows_raw, list) or not windows_raw:
        raise LayoutError(f"{where}: ct_window needs a non-empty list of windows "
                          "(name, center, width in HU)")
    windows, names = [], set()
    for w in windows_raw:
        if not isinstance(w, Mapping):
            raise LayoutError(f"{where}: a window must be a mapping, got {w!r}")
        _known(w, _WINDOW_KEYS, f"{where}, window")
        try:
            window = Window(name=str(w["name"]), center=float(w["center"]),
                            width=float(w["width"]))
        except (KeyError, TypeError, ValueError):
            raise LayoutError(f"{where}: a window needs name, center and width (numbers), "
                              f"got {dict(w)!r}") from None
        if not window.width > 0:
            raise LayoutError(f"{where}: window {window.name!r} has width {window.width:g}; "
                              "a window's width must be > 0")
        if window.name in names:
            raise LayoutError(f"{where}: duplicate window name {window.name!r}")
        names.add(window.name)
        windows.append(window)
    return Intensity(kind=kind, windows=tuple(windows))
