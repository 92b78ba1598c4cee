"""A global model as an MLflow model version: exported (``pt2``, input example all zeros),
logged, registered with all its tags in one call, and its backbone's weights uploaded for
``medfed export`` - on the background writer's thread (``server/registration.py``)."""

from __future__ import annotations

import json
import logging
import tempfile

import numpy as np
import torch

from models.foundation import base_digest
from models.foundation.adapt import FoundationBackbone
from models.foundation.export import PAIR_DIR, export_foundation, save_pair
from models.foundation.pair import PretrainedPair
from models.foundation.swin import SwinSegmenter, export_swin
from models.serving import (ExportedClassifier, ExportedSegmenter, plain_backbone, servable,
                            trained_backbone)
from models.weights import save_pretrained
from protocol.layout import Layout
from protocol.serving import SEGMENTATION_CLASS_NAMES, ServingSpec

from .config import ExperimentConfig
from .model_export import FLAVOR, ReusedExport
from .registration import RoundWrites

log = logging.getLogger(__name__)

# Explicit requirements: MLflow's inference imports the model in a subprocess (slow, noisy).
_PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "einops", "numpy"]
# What Model.log hands the flavor's save_model besides the model and its example: the same
# for a version and for a template traced ahead of the first (prepare_export).
_SAVE_OPTIONS = {"pip_requirements": _PIP_REQUIREMENTS, "serialization_format": "pt2"}


def register_version(cfg: ExperimentConfig, mlflow, client, run_id: str,
                     writes: RoundWrites, export: ReusedExport | None = None,
                     source_run=None) -> str:
    """Export, log and register one global model as a version (on the writer's thread):
    its files first, then the version with all its tags in one call. ``export``: the
    phase's traced program, reused for its later rounds (``server/model_export.py``);
    ``source_run``: the MLflow run ``run_id`` as read once (its params do not change)."""
    from mlflow.models import Model

    model, rnd, multi_label = writes.model, writes.round, writes.multi_label
    exported, example = _export_inputs(model, multi_label)
    serving = _serving_spec(cfg, exported, multi_label=multi_label)
    metadata = (_model_metadata(model) or {}) | (serving.to_metadata() if serving else {})
    # mlflow.pytorch.log_model is Model.log with the mlflow.pytorch flavor; ReusedExport is
    # that flavor tracing once per phase. MLflow's serving-input validation (load the saved
    # model, score the example; a failure is only logged) is ReusedExport's own check
    # instead: the traced program loaded back scores the example and a probe as the model
    # in memory does, and so does each reused version (else it is traced again).
    flavor = export if export is not None else mlflow.pytorch
    # Given a run, Model.log reads the whole history of every metric of the run - one query
    # per metric name, per-site metrics included - to copy this step's onto the model: per
    # version, work that grows with the sites and the rounds. The writer's thread has no
    # active run: the logged model is made here with its source run (and the run's params,
    # as Model.log would) and linked as the run's output at this step, without that copy.
    # (Recovery runs on the round loop's thread, whose run is active: Model.log links it.)
    model_id = None
    if mlflow.active_run() is None:
        run = source_run or client.get_run(run_id)
        model_id = mlflow.initialize_logged_model(
            name=f"global-round-{rnd}", source_run_id=run_id,
            experiment_id=run.info.experiment_id,
            params={k: str(v) for k, v in run.data.params.items()}).model_id
    info = Model.log(
        artifact_path=None, name=f"global-round-{rnd}", flavor=flavor, flavor_name=FLAVOR,
        pytorch_model=exported, input_example=example, step=rnd, metadata=metadata or None,
        model_id=model_id, validate_serving_input=export is None, **_SAVE_OPTIONS,
    )
    if model_id is not None:
        from mlflow.entities import LoggedModelOutput

        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=rnd)])
    name = cfg.tracking.registered_model
    # All tags in the creating call: a version exists with its tags or not at all (its
    # weights follow; until the journal entry is gone, recovery redoes the round).
    tags = dict(writes.version_tags)
    if export is not None and export.scores_like_model is False:
        tags["serving_check"] = "failed"     # registered as traced, but it scores otherwise
    version = create_version(client, name, info.model_uri, info.model_id, tags)
    extra = {"task": cfg.task.name, "class_names": list(cfg.task.class_names),
             "registered_model": name, "version": version}
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model, SwinSegmenter):
            # MONAI's own format: SwinUNETR(**constructor) + safetensors, LoRA merged
            export_swin(model, tmp)
        elif isinstance(backbone := trained_backbone(model), FoundationBackbone):
            # The family's own format: merged save_pretrained / MONAI safetensors, the
            # peft adapter directory, and the multi-channel adaptation parts.
            export_foundation(backbone, tmp, extra=extra)
            if isinstance(model, PretrainedPair):     # CLIP/SigLIP pretraining: both towers
                save_pair(model, f"{tmp}/{PAIR_DIR}")
        else:
            save_pretrained(plain_backbone(model), tmp, extra=extra)
        # what `medfed export` hands out
        client.log_artifacts(run_id, tmp, writes.version_tags["weights"])
    return version


def prepare_export(export: ReusedExport, model: torch.nn.Module, multi_label: bool) -> bool:
    """Trace ``export``'s template from ``model`` (the phase's initial global model) exactly
    as :func:`register_version` would trace its first version; whether one is kept."""
    exported, example = _export_inputs(model, multi_label)
    return export.prepare(exported, example, **_SAVE_OPTIONS)


def _export_inputs(model: torch.nn.Module, multi_label: bool
                   ) -> tuple[torch.nn.Module, np.ndarray]:
    """The module a version serves and its input example (all zeros, never a patient's)."""
    exported = servable(model, multi_label=multi_label).eval()
    # Batch of 2 so torch.export keeps the batch dimension dynamic (pt2 format).
    return exported, np.zeros((2, *exported.input_shape), dtype=np.float32)


def ensure_registered_model(client, name: str) -> None:
    """Create the registered model ``name`` unless it exists (a resumed run, an earlier
    phase or run in the same store): once per phase, not once per version."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS),
                                  ErrorCode.Name(ALREADY_EXISTS)):
            raise


def create_version(client, name: str, model_uri: str, model_id: str,
                   tags: dict[str, str]) -> str:
    """A version of the registered model ``name`` (which must exist) for the logged model
    ``model_id``, with all its tags in the creating call; returns its number.

    What ``mlflow.register_model`` records for a ``models:/`` URI - the version (source the
    URI; the registry resolves the run from the logged model) and the logged model's
    ``mlflow.modelVersions`` tag - without its per-version extras: an attempt to create the
    registered model again (a failing insert every round), a new client and a re-read of the
    logged model. The logged model was made for this version alone, so the tag lists just
    this version.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    created = client.create_model_version(name, model_uri, tags=tags, model_id=model_id)
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
        [{"name": created.name, "version": created.version}])})
    return str(created.version)


def _serving_spec(cfg: ExperimentConfig, exported: torch.nn.Module, *, multi_label: bool
                  ) -> ServingSpec | None:
    """What ``medfed predict`` needs to score new studies with a classifier or a segmenter
    version: its layout (brain_mri_4seq included), the sites' preprocessing, its class names
    (a segmenter's: background / lesion, per voxel); None for an encoder (a pretraining
    phase) or a config composed without a layout."""
    if not cfg.data.layout:
        return None
    if isinstance(exported, ExportedClassifier):
        names, output = tuple(cfg.task.class_names), "sigmoid" if multi_label else "softmax"
    elif isinstance(exported, ExportedSegmenter):
        # the task's class names are the studies' (glioma grades); the network's output
        # channels are its own two classes (background / lesion: SwinSegmenter and UNETR)
        names, output = SEGMENTATION_CLASS_NAMES, "voxel_softmax"
    else:
        return None
    try:
        spec = ServingSpec(layout=Layout.from_dict(cfg.data.layout), class_names=names,
                           task=cfg.task.name, output=output, image_size=cfg.task.image_size)
    except ValueError as err:          # LayoutError, ServingSpecError
        log.warning("model version registered without serving metadata: %s", err)
        return None
    shape = tuple(spec.preprocessing()["input_shape"])
    if tuple(exported.input_shape) != shape:
        # the metadata must describe exactly what the graph takes, or predict would lie
        log.warning("model version registered without serving metadata: the model takes "
                    "%s per study, the layout's preprocessing gives %s",
                    tuple(exported.input_shape), shape)
        return None
    return spec


def _model_metadata(model: torch.nn.Module) -> dict[str, str] | None:
    """MLmodel metadata: for a foundation model, which pretrained encoder it adapts (name,
    family, method) and the sha256 of its frozen base, so a user can check their own copy."""
    backbone = model if isinstance(model, SwinSegmenter) else trained_backbone(model)
    if not isinstance(backbone, (FoundationBackbone, SwinSegmenter)):
        return None
    c = backbone.config
    return {"foundation_weights": c.weights, "foundation_family": backbone.family,
            "foundation_method": c.method, "foundation_base_sha256": base_digest(model)}
