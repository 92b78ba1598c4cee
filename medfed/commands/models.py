"""Model commands: ``export`` a registered model version for use outside MLflow."""

from __future__ import annotations

import argparse
from pathlib import Path


def export(args: argparse.Namespace) -> int:
    """Write a registered version as a ``save_pretrained`` directory."""
    from medfed.export import export_version

    out = export_version(args.tracking_uri, args.model, args.version, Path(args.out),
                         force=args.force)
    print(f"exported {args.model} version {args.version} to {out} "
          f"(start a run from it with model.pretrained={out})")
    return 0
