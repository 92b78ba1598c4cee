"""``medfed export``: a registered model version as a local ``save_pretrained`` directory.

Every version the server registers carries its backbone weights and config as run artifacts
(``weights/round-N``, tag ``weights``); export downloads them, adds the tokenizer of a model
that has one, and checks the result loads (a foundation model's version: the export of
``models/foundation/export.py``, merged encoder + peft adapter + adaptation parts). ``model.pretrained=DIR`` starts a run from it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from models.foundation.export import is_export, load_export
from models.foundation.swin import is_swin_export, load_swin
from models.weights import load_pretrained


class ExportError(ValueError):
    """The version does not exist or carries no exportable weights."""


def export_version(tracking_uri: str, name: str, version: str, out: Path, *,
                   force: bool = False) -> Path:
    """Download version ``version`` of registered model ``name`` to ``out``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; pass --force to replace it")
    client = mlflow.MlflowClient(tracking_uri)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as err:
        raise ExportError(f"no version {version} of registered model {name!r} in "
                          f"{tracking_uri}: {err.message.splitlines()[0]}") from None
    weights = mv.tags.get("weights")
    if not weights:
        raise ExportError(f"{name} version {version} carries no weights artifact (registered "
                          "by an older MedFed?)")
    if out.exists():
        shutil.rmtree(out)
    staged = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=weights,
                                                      tracking_uri=tracking_uri,
                                                      dst_path=str(out.parent / f".{out.name}.tmp")))
    shutil.move(str(staged), str(out))
    shutil.rmtree(out.parent / f".{out.name}.tmp", ignore_errors=True)
    # the directory must load before we call it exported (a foundation version: its
    # family-format encoder, adapter and adaptation parts; a SwinUNETR: MONAI's own format)
    if is_export(out):
        load_export(out)
    elif is_swin_export(out):
        load_swin(out)
    else:
        load_pretrained(out)
    return out
