"""``medfed predict``: score new DICOM studies at a site with a registered model version.

The version says how to read a study (:class:`protocol.serving.ServingSpec` in its MLflow
model metadata: layout, preprocessing, class names); the data folder says nothing about it.
Studies go through exactly what a site does before evaluating: the site's reader for the
layout (:func:`client.data.site.load_site` for brain_mri_4seq,
:func:`client.data.layout_site.load_layout_site` for the others) and the evaluation
transforms of :class:`client.data.dataset.StudyDataset`; the stock MLflow pyfunc scores them.

Out comes one row per study: its pseudonymous key (under the site's own pseudonym secret,
:mod:`client.data.pseudonyms`, the key its deployed ClientApp uses), one probability per
class, the predicted class; a segmentation version (``voxel_softmax``) also writes each
study's mask (:mod:`medfed.predict_masks`). No DICOM header value, UID or path
reaches a row, a file name or a log line; what could not be read is counted by reason.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from protocol.serving import ServingSpec, ServingSpecError

if TYPE_CHECKING:
    from .predict_masks import MaskPredictions

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/]+)/(?P<version>\d+)$")
BATCH = 32


class PredictError(ValueError):
    """The model version cannot be found or scored; the message says why."""


@dataclass
class Predictions:
    """Per-study probabilities, and counts of what was read and skipped (no identifiers)."""

    spec: ServingSpec
    keys: list[str]                  # pseudonymous study keys
    probabilities: np.ndarray        # [N, C] float32, columns: spec.class_names
    skipped: Counter                 # reason -> count (files, series, studies)
    files: int

    def predicted(self) -> list[str]:
        """Per study: the most probable class, or for a multi-label model (``sigmoid``) the
        findings at probability >= 0.5 joined by ``;`` (empty: none)."""
        names = self.spec.class_names
        if self.spec.output == "sigmoid":
            return [";".join(n for n, p in zip(names, row) if p >= 0.5)
                    for row in self.probabilities]
        return [names[i] for i in self.probabilities.argmax(1)]

    def to_csv(self) -> str:
        """``study_key, p_<class>..., predicted``: one row per study."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["study_key", *(f"p_{n}" for n in self.spec.class_names), "predicted"])
        for key, row, label in zip(self.keys, self.probabilities, self.predicted()):
            writer.writerow([key, *(f"{p:.6f}" for p in row), label])
        return out.getvalue()


def load_version(model_uri: str, tracking_uri: str | None = None):
    """``(pyfunc model, ServingSpec)`` of ``models:/NAME/VERSION``.

    Raises
    ------
    PredictError
        A malformed URI, an unknown version, or a version without serving metadata.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    match = _MODEL_URI.match(model_uri)
    if match is None:
        raise PredictError(f"--model must be models:/NAME/VERSION, got {model_uri!r}")
    client = mlflow.MlflowClient(tracking_uri)
    try:
        source = client.get_model_version_download_uri(match["name"], match["version"])
        local = mlflow.artifacts.download_artifacts(artifact_uri=source,
                                                    tracking_uri=tracking_uri)
        check_loads_no_code(model_uri, Path(local))
        with _pickle_refused():
            model = mlflow.pyfunc.load_model(local)
    except MlflowException as err:
        raise PredictError(f"cannot load {model_uri}: {err.message.splitlines()[0]}") from None
    try:
        spec = ServingSpec.from_metadata(model.metadata.metadata)
    except ServingSpecError as err:
        raise PredictError(f"{model_uri}: {err}") from None
    _check_signature(model_uri, model.metadata.signature, spec)
    return model, spec


def check_loads_no_code(model_uri: str, local: Path) -> None:
    """Refuse, before anything of it is imported or unpickled, a version that loading would
    let run code at this site: the registry is the coordinator's, and a site never executes
    code because the coordinator sent it. A MedFed version is a ``torch.export`` program
    (``model.pt2``) loaded by ``mlflow.pytorch``, with no code directory; a pickled module
    (``model.pth``), another loader module or bundled code is none of that. What remains
    inside a pt2 archive is checked by MLflow itself with pickle deserialization off
    (``_pickle_refused``: only records torch's ``weights_only`` unpickler accepts).

    Raises
    ------
    PredictError
        Naming what would have been loaded.
    """
    from mlflow.models import Model

    try:
        flavors = Model.load(str(local / "MLmodel")).flavors
    except Exception:  # noqa: BLE001 - an unreadable MLmodel is refused, whatever the reason
        raise PredictError(f"{model_uri}: its MLmodel file cannot be read") from None
    pyfunc, torch_flavor = flavors.get("python_function") or {}, flavors.get("pytorch")
    data = local / str((torch_flavor or {}).get("model_data", "data"))
    why = ("it has no pytorch flavour" if torch_flavor is None else
           f"its loader is {pyfunc.get('loader_module')!r}, not 'mlflow.pytorch'"
           if pyfunc.get("loader_module") != "mlflow.pytorch" else
           "it bundles code" if pyfunc.get("code") or torch_flavor.get("code") else
           "it is a pickled module, not a torch.export program"
           if not (data / "model.pt2").is_file() or (data / "model.pth").exists() else None)
    if why:
        raise PredictError(f"{model_uri} refused: {why}; loading it could run code from the "
                           "registry at this site (MedFed registers torch.export programs)")


@contextlib.contextmanager
def _pickle_refused():
    """MLflow's own switch, off while a version loads (its default is on): a pickled model
    is refused and a pt2 archive must be pickle-free (``weights_only`` records only)."""
    variable = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    before = os.environ.get(variable)
    os.environ[variable] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before


def _check_signature(model_uri: str, signature, spec: ServingSpec) -> None:
    """The version's tensor signature takes what its layout's preprocessing gives and returns
    what its output kind says, before any study is read (e.g. a 3D network under a 2D layout)."""
    from mlflow.types import TensorSpec

    def shape(schema) -> tuple[int, ...] | None:
        inputs = schema.inputs if schema is not None else []
        return tuple(inputs[0].shape[1:]) if len(inputs) == 1 and \
            isinstance(inputs[0], TensorSpec) else None

    if signature is None:
        raise PredictError(f"{model_uri} has no tensor signature; register it again with "
                           "this MedFed")
    dims = spec.layout.dims
    takes, gives = shape(signature.inputs), tuple(spec.preprocessing()["input_shape"])
    if takes != gives:
        raise PredictError(f"{model_uri} takes studies of shape {list(takes or [])} but its "
                           f"layout {spec.layout.name} ({dims}) gives {list(gives)}: it "
                           "cannot score them; register it with the layout it was trained on")
    returns, expected = shape(signature.outputs), spec.output_shape()
    if returns != expected:
        raise PredictError(f"{model_uri} returns {list(returns or [])} per study but its "
                           f"metadata ({spec.output}) says {list(expected)}; register it "
                           "again with this MedFed")


def site_pseudonym_key(data_dir: Path, privacy_dir: Path | str | None = None) -> bytes:
    """The site's pseudonym secret where its ClientApp finds it (``privacy_dir``, default
    ``<data-dir>/.medfed``, as ``medfed site --privacy-dir``), created 0600 on first use."""
    from client.data.pseudonyms import site_key
    from client.privacy.policy import state_dir
    from protocol import wire

    settings = {wire.NODE_PRIVACY_DIR: str(privacy_dir)} if privacy_dir else {}
    return site_key(state_dir(settings, Path(data_dir).resolve()))


def read_studies(data_dir: Path, spec: ServingSpec, key: bytes | None):
    """``(SiteData, StudyDataset)`` of every study in ``data_dir`` (labelled or not), read and
    transformed as a site does for evaluation with the version's layout; pseudonyms under
    ``key``."""
    from client.data.dataset import StudyDataset
    from client.data.layout_site import dataset_options, read_site

    data = read_site(data_dir, spec.site_layout, key=key)
    return data, StudyDataset(data.studies, spec.image_size, **dataset_options(spec.site_layout))


def score_batches(model, spec: ServingSpec, dataset, batch: int = BATCH):
    """``(start, outputs [b, *spec.output_shape()])`` per batch of ``dataset``'s studies,
    scored by the pyfunc ``model``: one batch of images in memory at a time."""
    expected = tuple(spec.preprocessing()["input_shape"])
    for start in range(0, len(dataset), batch):
        images = np.stack([dataset[i]["image"].numpy()
                           for i in range(start, min(start + batch, len(dataset)))])
        if images.shape[1:] != expected:
            raise PredictError(f"preprocessed studies have shape {images.shape[1:]}, the "
                               f"version expects {expected}")
        out = np.asarray(model.predict(images), dtype=np.float32)
        if out.shape != (len(images), *spec.output_shape()):
            raise PredictError(f"the model returned shape {out.shape}, expected "
                               f"{(len(images), *spec.output_shape())}")
        yield start, out


def check_out_file(out: Path | None, *, force: bool = False) -> None:
    """``out`` as the CSV file a classifier's predictions go to (None: stdout): a file in an
    existing, writable folder, not replacing one unless ``force``.

    Raises
    ------
    PredictError
        ``out`` is a folder, or its folder does not exist or cannot be written (it is not
        created: a mistyped path must not become a folder somewhere else).
    FileExistsError
        ``out`` exists and ``force`` is not set.
    """
    if out is None:
        return
    out = Path(out)
    if out.is_dir():
        raise PredictError(f"--out {out} is a folder; this version writes one CSV file: name "
                           "the file")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    folder = out.parent
    if not folder.is_dir():
        raise PredictError(f"--out {out}: its folder does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PredictError(f"--out {out}: its folder cannot be written by this user")


def open_version(model_uri: str, *, tracking_uri: str | None = None, out: Path | None = None,
                 force: bool = False, min_voxels: int = 1):
    """``(pyfunc model, ServingSpec)`` of a version, with every refusal that needs no study
    done: the options, the version itself (:func:`load_version`) and ``out`` for what the
    version writes (:func:`check_out_file` or :func:`medfed.predict_masks.check_out_dir`).
    Nothing is read or created at the site before this returns, not even its pseudonym key.

    Raises
    ------
    PredictError, FileExistsError
        As :func:`predict`.
    """
    from .predict_masks import check_out_dir

    if min_voxels < 1:
        raise PredictError(f"--min-voxels must be >= 1, got {min_voxels}")
    model, spec = load_version(model_uri, tracking_uri)
    if spec.segmentation:
        check_out_dir(out, force=force)
    else:
        check_out_file(out, force=force)
    return model, spec


def score_studies(model, spec: ServingSpec, data_dir: Path | str, *, key: bytes | None,
                  out: Path | None = None, min_voxels: int = 1
                  ) -> Predictions | MaskPredictions:
    """Score every readable study in ``data_dir`` with a version from :func:`open_version`
    (which checked ``out`` and ``min_voxels``); see :func:`predict`."""
    from .predict_masks import segment

    data, dataset = read_studies(Path(data_dir), spec, key)
    skipped, keys = Counter(data.report.skipped), [s.key for s in data.studies]
    if spec.segmentation:
        return segment(score_batches(model, spec, dataset), spec, keys, Path(out),
                       skipped=skipped, files=data.report.files, min_voxels=min_voxels)
    probs = np.concatenate([scores for _, scores in score_batches(model, spec, dataset)])
    return Predictions(spec, keys, probs, skipped, data.report.files)


def predict(model_uri: str, data_dir: Path | str, *, key: bytes | None,
            tracking_uri: str | None = None, out: Path | None = None, force: bool = False,
            min_voxels: int = 1) -> Predictions | MaskPredictions:
    """Score every readable study in ``data_dir`` with a registered version; study keys are
    pseudonyms under ``key`` (the site's secret, :func:`site_pseudonym_key`).

    A classifier gives :class:`Predictions` (its CSV for ``out``, a file, which the caller
    writes). A segmentation version writes each study's mask and the CSV into ``out``, an
    existing folder (:mod:`medfed.predict_masks`; a class is present from ``min_voxels``
    voxels), and gives :class:`medfed.predict_masks.MaskPredictions`. Either way ``out`` is
    checked before any study is read; ``force`` replaces earlier predictions there. A caller
    that creates the key on first use calls :func:`open_version` first, then makes the key,
    then :func:`score_studies` (``medfed predict`` does), so a refusal leaves no key behind.

    Raises
    ------
    PredictError
        The version cannot be loaded, carries no serving metadata, or cannot score the
        layout's studies; a segmentation version without an existing ``out`` folder; a
        classifier's ``out`` in a folder that does not exist or cannot be written.
    FileExistsError
        ``out`` holds earlier predictions and ``force`` is not set.
    client.data.site.SiteDataError
        ``data_dir`` holds no readable study (the message counts the skips by reason).
    """
    model, spec = open_version(model_uri, tracking_uri=tracking_uri, out=out, force=force,
                               min_voxels=min_voxels)
    return score_studies(model, spec, data_dir, key=key, out=out, min_voxels=min_voxels)
