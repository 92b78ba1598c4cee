"""Layout files: the shipped layouts (``conf/data/layout/*.yaml``) and a user's own YAML.

The schema and its validation are the protocol's (:mod:`protocol.layout`, shared with the
server, which checks a composed experiment's layout before any site trains); they are
re-exported here so the site's data code has one import for both.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from protocol.layout import (DIMS, INTENSITY_KINDS, MISSING_POLICIES, RESOLVE_POLICIES,
                             Channel, ChannelRule, Intensity, Layout, LayoutError, Window,
                             check_volume_layout)

__all__ = ["DIMS", "INTENSITY_KINDS", "LAYOUT_DIR", "MISSING_POLICIES", "RESOLVE_POLICIES",
           "Channel", "ChannelRule", "Intensity", "Layout", "LayoutError", "Window",
           "check_volume_layout", "load_layout", "shipped_layouts"]

# The repository's conf/data/layout (this file is client/data/layout.py).
LAYOUT_DIR = Path(__file__).resolve().parents[2] / "conf" / "data" / "layout"


def shipped_layouts() -> tuple[str, ...]:
    """Names of the layouts in ``conf/data/layout/``."""
    return tuple(sorted(p.stem for p in LAYOUT_DIR.glob("*.yaml")))


def load_layout(name_or_path: str | Path) -> Layout:
    """A shipped layout by name (``chest_xray``) or a user's YAML file by path.

    Raises
    ------
    LayoutError
        Unknown name (listing the shipped ones), unreadable file, or an invalid layout.
    """
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        path = Path(text)
        if not path.is_file():
            raise LayoutError(f"layout file {path.name!r} not found")
    else:
        path = LAYOUT_DIR / f"{text}.yaml"
        if not path.is_file():
            raise LayoutError(f"unknown layout {text!r}; shipped: {', '.join(shipped_layouts())}"
                              " (or give a path to a .yaml file)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)      # where the parser gave up
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise LayoutError(f"layout file {path.name!r} is not valid YAML{where}: "
                          f"{problem}") from None
    return Layout.from_dict(raw)
