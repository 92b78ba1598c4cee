"""``medfed export``: a registered model version as a local ``save_pretrained`` directory.

Every version the server registers carries its backbone weights and config as run artifacts
(``weights/round-N``, tag ``weights``); export downloads them, adds the tokenizer of a model
that has one, and checks the result loads (a foundation model's version: the export of
``models/foundation/export.py``, merged encoder + peft adapter + adaptation parts; a
SwinUNETR's: MONAI's own format). ``model.pretrained=DIR`` starts a run from an export of
MedFed's own ViT only; ``exported_message`` says how each kind is used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from models.foundation.export import (ADAPTATION_CONFIG, ADAPTATION_WEIGHTS, ADAPTER_DIR,
                                      ENCODER_DIR, is_export, load_export)
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


def exported_message(out: Path, name: str, version: str) -> str:
    """What ``medfed export`` wrote to ``out`` and how to use it (the command prints it)."""
    said = f"exported {name} version {version} to {out}"
    whole = (f"the whole model: medfed predict --model models:/{name}/{version} --data-dir "
             f"SITE, or mlflow.pyfunc.load_model('models:/{name}/{version}')")
    if is_export(out):          # model.pretrained takes MedFed's own ViT only
        meta = json.loads((out / ADAPTATION_CONFIG).read_text())
        lines = [f"{ENCODER_DIR}/  the fine-tuned encoder, adapters merged: "
                 f"{_encoder_loader(out / ENCODER_DIR, meta['family'])}"]
        if (out / ADAPTER_DIR).is_dir():
            method = meta.get("config", {}).get("method", "peft")
            lines.append(f"{ADAPTER_DIR}/  the {method} adapters alone, for the ORIGINAL "
                         "encoder: peft's PeftModel.from_pretrained(original_encoder, "
                         f"'{out / ADAPTER_DIR}')")
        lines += [f"{ADAPTATION_WEIGHTS} + {ADAPTATION_CONFIG}  the new patch/channel "
                  "embeddings and head, and what they are; "
                  f"models.foundation.export.load_export('{out}') rebuilds the whole model"]
        if meta.get("parts", {}).get("head") is not None:     # a pretraining objective's: none
            lines.append(whole)
        return "\n  ".join([f"{said}: a foundation model in its family's own format", *lines])
    if is_swin_export(out):
        return (f"{said}: a SwinUNETR in MONAI's own format, LoRA merged: monai's "
                f"SwinUNETR(**json.load(open('{out / 'config.json'}'))['constructor'])"
                f".load_state_dict(safetensors.torch.load_file('{out / 'model.safetensors'}'))"
                f"; {whole}")
    return f"{said} (start a run from it with model.pretrained={out})"


def _encoder_loader(encoder: Path, family: str) -> str:
    """The call that loads an exported ``encoder/`` with its family's own library."""
    from models.foundation.loading import HF_MODEL_TYPES, MONAI_MODEL_TYPE, read_config
    from models.foundation.timm_vit import TIMM_FAMILY

    if family == TIMM_FAMILY:
        return f"timm.create_model('local-dir:{encoder}', pretrained=True)"
    if family == MONAI_MODEL_TYPE:
        return (f"monai's ViT(**json.load(open('{encoder / 'config.json'}'))['constructor'])"
                ".load_state_dict(safetensors.torch.load_file("
                f"'{encoder / 'model.safetensors'}'))")
    model_type = read_config(encoder).get("model_type")
    cls = HF_MODEL_TYPES[model_type][0] if model_type in HF_MODEL_TYPES else "AutoModel"
    return f"transformers' {cls}.from_pretrained('{encoder}')"
