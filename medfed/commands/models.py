"""Model commands: ``export`` a registered model version for use outside MLflow;
``convert-weights`` a pickle checkpoint to safetensors for a foundation model;
``feature-stats`` its public feature mean and spread; ``predict`` new studies at a site with
a registered version."""

from __future__ import annotations

import argparse
from pathlib import Path


def export(args: argparse.Namespace) -> int:
    """Write a registered version as a ``save_pretrained`` directory and say how to use it."""
    from medfed.export import export_version, exported_message

    out = export_version(args.tracking_uri, args.model, args.version, Path(args.out),
                         force=args.force)
    print(exported_message(out, args.model, args.version))
    return 0


def convert_weights(args: argparse.Namespace) -> int:
    """Convert ``SRC`` (a pickle checkpoint, sharded or not, or a MONAI bundle) to
    safetensors in ``DST`` (``models.foundation.convert``) with
    ``torch.load(weights_only=True)``: tensors and plain containers only, no code runs."""
    from models.foundation.bundle import is_bundle, weights_dir
    from models.foundation.convert import SAFETENSORS_INDEX, convert_weights as convert
    from models.foundation.loading import WEIGHTS_FILE

    out = convert(Path(args.src), Path(args.dst), force=args.force)
    written = (weights_dir(out) if is_bundle(out) else out) / WEIGHTS_FILE   # bundle: models/
    if not written.is_file():               # a sharded checkpoint: its shards' index
        written = out / SAFETENSORS_INDEX
    print(f"wrote {written}; place {out.name} in foundation-dir and name it "
          f"with model.options.weights={out.name}")
    return 0


def feature_stats(args: argparse.Namespace) -> int:
    """Write ``feature_mean.safetensors`` and ``feature_scale.safetensors`` beside the
    experiment's foundation weights, from the public cohort in ``--data``."""
    from medfed.feature_stats import public_feature_stats
    from server.config import load_experiment

    cfg = load_experiment(args.overrides)
    out = public_feature_stats(cfg, Path(args.data), workers=args.workers,
                               directions=args.directions)
    low, median, high = out["scale_min_median_max"]
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(out["skipped"].items())) or "none"
    print(f"{out['studies']} public studies (skipped: {skipped}; {out['signature']}): mean norm "
          f"{out['mean_norm']:.3g}, median distance from it {out['median_distance_from_mean']:.3g}"
          f"; spread {low:.3g} / {median:.3g} / {high:.3g} (min / median / max), "
          f"{out['scale_floored_dimensions']} dimensions floored")
    if out["variance_share"] is not None:
        print(f"the {args.directions} directions hold {out['variance_share']:.1%} of the "
              "public variance")
    for path in out["files"]:
        print(f"wrote {path}")
    print("copy these files into every site's copy of the weights (they are part of the "
          "frozen-base digest), then run with +model.options.centre_features=true and "
          "+model.options.scale_features=true or +model.options.project_features=k")
    return 0


def predict(args: argparse.Namespace) -> int:
    """Score the studies in ``--data-dir`` with ``--model``; CSV to ``--out`` or stdout (a
    segmentation version: CSV and masks into the ``--out`` folder), counts (studies scored,
    skips by reason) to stderr."""
    import sys

    from client.data.site import dicom_folder
    from medfed.predict import Predictions, open_version, score_studies, site_pseudonym_key

    out = Path(args.out) if args.out else None
    data_dir = Path(args.data_dir)
    dicom_folder(data_dir)              # a wrong path fails before a key is made in it
    # every refusal (version, --out, options) before the key is made: an operator's error
    # must not leave a new pseudonym secret in the site's state folder
    model, spec = open_version(args.model, tracking_uri=args.tracking_uri, out=out,
                               force=args.force, min_voxels=args.min_voxels)
    result = score_studies(model, spec, data_dir, out=out, min_voxels=args.min_voxels,
                           key=site_pseudonym_key(data_dir, args.privacy_dir))
    if isinstance(result, Predictions):
        text = result.to_csv()
        if out is None:
            sys.stdout.write(text)
        else:
            out.write_text(text)
        where = ""
    else:                               # a segmenter wrote its masks and CSV into --out
        where = f" into {out} (predictions.csv, masks/)"
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(result.skipped.items())) or "none"
    print(f"predicted {len(result.keys)} studies ({result.files} files read) with "
          f"{args.model} (layout {result.spec.layout.name}){where}; skipped: {skipped}",
          file=sys.stderr)
    return 0
