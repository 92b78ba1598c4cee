"""Model commands: ``export`` a registered model version for use outside MLflow;
``convert-weights`` a pickle checkpoint to safetensors for a foundation model."""

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


def convert_weights(args: argparse.Namespace) -> int:
    """Convert ``SRC`` (a pickle checkpoint) to ``DST/model.safetensors`` with
    ``torch.load(weights_only=True)``: tensors and plain containers only, no code runs."""
    from models.foundation.loading import convert_weights as convert

    out = convert(Path(args.src), Path(args.dst))
    print(f"wrote {out / 'model.safetensors'}; place {out.name} in foundation-dir and name it "
          f"with model.options.weights={out.name}")
    return 0
