"""``medfed predict`` on a segmentation version (a fine-tuned SwinUNETR registered as the server
does): the stock pyfunc's per-voxel probabilities equal the site evaluation's forward on the
same preprocessed study, each study's mask (argmax) lands in ``OUT/masks/<key>.npy`` with one
CSV row of lesion voxels per study, nothing identifying reaches a file, a file name or stderr;
where it cannot work it refuses with one line and exit 2."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import SwinUNETR

from client.data.pseudonyms import site_key
from medfed.cli import main
from models.foundation.monai_nets import SWIN_UNETR_TYPE, save_monai
from protocol.serving import SEGMENTATION_CLASS_NAMES, ServingSpec
from server.config import load_experiment

from .test_predict import ATOL, register, secrets_of, site_probabilities

SWIN2D = dict(in_channels=1, out_channels=2, feature_size=12, depths=[1, 1, 1, 1],
              num_heads=[1, 1, 2, 2], window_size=4, spatial_dims=2)
SWIN3D = SWIN2D | {"window_size": 2, "spatial_dims": 3}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> Path:
    """A foundation-dir holding a tiny pretrained 2D and 3D SwinUNETR (MONAI layout)."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    save_monai(SwinUNETR(**SWIN2D), SWIN2D, root / "swin-2d", model_type=SWIN_UNETR_TYPE)
    save_monai(SwinUNETR(**SWIN3D), SWIN3D, root / "swin-3d", model_type=SWIN_UNETR_TYPE)
    return root


def swin_config(encoders: Path, runs: Path):
    """The lesion-segmentation experiment on the brain-MRI sites with the 2D SwinUNETR."""
    return load_experiment(["model=foundation_swin", "model.options.weights=swin-2d",
                            f"model.foundation_dir={encoders}", "model.options.lora_rank=2",
                            "task=lesion_seg", "task.image_size=64", "federation=sim2",
                            f"runs_dir={runs}", "tracking.log_models=true"])


@pytest.fixture(scope="module")
def seg_version(encoders, tmp_path_factory):
    """``(cfg, model, uri, tracking uri)`` of a registered (perturbed) SwinUNETR version."""
    out = tmp_path_factory.mktemp("seg-version")
    cfg = swin_config(encoders, out / "runs")
    return cfg, *register(cfg, out)


def run_predict(uri, tracking, site_dir: Path, state: Path, *extra: str) -> int:
    return main(["predict", "--model", uri, "--data-dir", str(site_dir), "--tracking-uri",
                 tracking, "--privacy-dir", str(state), *extra])


def one_error(captured) -> str:
    """The one ``medfed: error`` line of a refused command (no traceback, nothing on stdout)."""
    errors = [line for line in captured.err.splitlines() if line.startswith("medfed: error")]
    assert captured.out == "" and len(errors) == 1 and "Traceback" not in captured.err
    return errors[0]


def test_the_version_serves_voxel_probabilities_equal_to_the_site_evaluation(
        seg_version, tiny_sites, tmp_path):
    import mlflow

    from medfed.predict import load_version, read_studies, score_batches

    cfg, model, uri, tracking = seg_version
    mlflow.set_tracking_uri(tracking)
    info = mlflow.models.get_model_info(uri)
    spec = ServingSpec.from_metadata(info.metadata)
    assert spec.output == "voxel_softmax" and spec.class_names == SEGMENTATION_CLASS_NAMES
    assert spec.task == "segmentation" and spec.layout.name == "brain_mri_4seq"
    assert info.signature.inputs.inputs[0].shape == (-1, 4, 64, 64)
    assert info.signature.outputs.inputs[0].shape == (-1, 2, 64, 64)

    # what predict does: the stock pyfunc on the layout's reader and evaluation transforms
    site_dir = tiny_sites / "site-0"
    key = site_key(tiny_sites / "site-0" / ".medfed")
    pyfunc, spec = load_version(uri, tracking)
    data, dataset = read_studies(site_dir, spec, key)
    got = {}
    for start, probs in score_batches(pyfunc, spec, dataset, batch=4):   # several batches
        got |= {s.key: p for s, p in zip(data.studies[start:], probs)}
    assert len(got) == len(data.studies)

    expected = site_probabilities(model, site_dir, cfg, key)   # the model's own forward
    assert len(expected) >= 3 and set(expected) <= set(got)
    for k, probs in expected.items():
        assert probs.shape == (2, 64, 64)
        np.testing.assert_allclose(got[k], probs, rtol=0, atol=ATOL)
    # the inputs matter: per-voxel lesion probabilities differ between studies
    assert np.ptp(np.stack([p[1] for p in expected.values()]), axis=0).max() > 1e-3


def test_predict_writes_a_mask_and_a_row_per_study_and_no_phi(seg_version, tiny_sites,
                                                             tmp_path, capsys):
    cfg, model, uri, tracking = seg_version
    site_dir, out = tiny_sites / "site-0", tmp_path / "out"
    out.mkdir()
    state = tmp_path / "state"
    assert run_predict(uri, tracking, site_dir, state, "--out", str(out),
                       "--min-voxels", "20") == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert list(rows[0]) == ["study_key", "voxels_lesion", "fraction_lesion", "pmax_lesion",
                             "predicted"]
    assert f"predicted {len(rows)} studies" in err
    masks = sorted((out / "masks").iterdir())
    assert [p.name for p in masks] == sorted(f"{r['study_key']}.npy" for r in rows)

    expected = site_probabilities(model, site_dir, cfg, site_key(state))
    assert len(expected) >= 3
    for row in rows:
        mask = np.load(out / "masks" / f"{row['study_key']}.npy", allow_pickle=False)
        assert mask.dtype == np.uint8 and mask.shape == (64, 64)
        voxels = int((mask == 1).sum())
        assert int(row["voxels_lesion"]) == voxels
        assert float(row["fraction_lesion"]) == pytest.approx(voxels / 64**2, abs=1e-6)
        assert row["predicted"] == ("lesion" if voxels >= 20 else "background")
        probs = expected.get(row["study_key"])
        if probs is None:                  # unlabelled: not in the evaluation's split
            continue
        # the argmax of the evaluation's probabilities, away from float ties
        clear = np.abs(probs[1] - probs[0]) > 10 * ATOL
        np.testing.assert_array_equal(mask[clear], probs.argmax(0)[clear])
        assert float(row["pmax_lesion"]) == pytest.approx(probs[1].max(), abs=ATOL)
    counts = [int(r["voxels_lesion"]) for r in rows]
    assert 0 < max(counts) and min(counts) < 64**2      # a mask that says something
    assert {r["predicted"] for r in rows} <= {"lesion", "background"}

    secrets = secrets_of(site_dir)
    assert len(secrets) > 20
    blobs = [(out / "predictions.csv").read_text(), err,
             *(p.read_bytes().decode("latin-1") for p in masks), " ".join(p.name for p in masks)]
    for blob in blobs:
        leaked = [s for s in secrets if s in blob]
        assert not leaked, f"{leaked[:3]} leaked"


def test_earlier_predictions_are_kept_unless_forced_and_then_replaced(seg_version, tiny_sites,
                                                                      tmp_path, capsys):
    _, _, uri, tracking = seg_version
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    stale = out / "masks" / "0123456789abcdef.npy"      # a study of an earlier run
    np.save(stale, np.zeros((64, 64), np.uint8))
    args = (uri, tracking, tiny_sites / "site-0", tmp_path / "state", "--out", str(out))
    assert run_predict(*args) == 2
    assert "already holds predictions" in one_error(capsys.readouterr()) and stale.exists()
    assert run_predict(*args, "--force") == 0
    assert not stale.exists() and (out / "predictions.csv").is_file()
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(list((out / "masks").iterdir())) == len(rows) > 0


def test_predict_refuses_what_cannot_work_with_one_line(seg_version, tiny_sites, tmp_path,
                                                       capsys):
    _, _, uri, tracking = seg_version
    site = tiny_sites / "site-0"
    state = tmp_path / "state"
    # no output folder: masks cannot go to stdout
    assert run_predict(uri, tracking, site, state) == 2
    assert "pass --out FOLDER" in one_error(capsys.readouterr())
    # a folder that does not exist is not made up
    missing = tmp_path / "nowhere" / "out"
    assert run_predict(uri, tracking, site, state, "--out", str(missing)) == 2
    assert "not an existing folder" in one_error(capsys.readouterr())
    assert not missing.parent.exists()
    out = tmp_path / "out"
    out.mkdir()
    assert run_predict(uri, tracking, site, state, "--out", str(out), "--min-voxels", "0") == 2
    assert "--min-voxels must be >= 1" in one_error(capsys.readouterr())
    assert not state.exists()       # no refusal above created the site's pseudonym key


def log_by_hand(exported, returns: tuple[int, ...], spec: ServingSpec, tmp_path: Path) -> str:
    """Register ``exported`` (per study: ``returns``) with ``spec``'s metadata (the server
    records none for a model it does not describe: a hand-made or tampered version); its
    tracking URI."""
    import mlflow
    from mlflow.models import infer_signature

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    signature = infer_signature(np.zeros((1, *exported.input_shape), np.float32),
                                np.zeros((1, *returns), np.float32))
    with mlflow.start_run():
        mlflow.pytorch.log_model(exported, name="hand", registered_model_name="hand",
                                 signature=signature, metadata=spec.to_metadata(),
                                 input_example=np.zeros((1, *exported.input_shape), np.float32),
                                 pip_requirements=["torch"], serialization_format="pt2")
    return tracking


class _RunsOnUnpickle(torch.nn.Module):
    """A tampered registry's model: unpickling it runs code (here: creates ``marker``)."""

    def __init__(self, marker: Path, input_shape: tuple[int, ...]):
        super().__init__()
        self.marker, self.input_shape = str(marker), input_shape

    def forward(self, images):
        return images

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_version_that_would_run_code_when_loaded_is_refused_before_loading(
        tiny_sites, tmp_path, capsys):
    """The registry is the coordinator's: a version pickled (or bundling code) would run its
    code at the site the moment ``mlflow.pyfunc.load_model`` unpickles it. Refused first, by
    what its MLmodel says, and MLflow's own pickle switch is off while a version loads.
    Mutation-checked: without ``check_loads_no_code`` the marker file is created."""
    import mlflow
    from mlflow.models import infer_signature

    marker = tmp_path / "ran-at-the-site"
    evil = _RunsOnUnpickle(marker, (4, 64, 64))
    spec = ServingSpec(layout=__import__("client.data.layout", fromlist=["x"]).load_layout(
        "brain_mri_4seq"), class_names=SEGMENTATION_CLASS_NAMES, task="segmentation",
        output="voxel_softmax", image_size=64)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    signature = infer_signature(np.zeros((1, 4, 64, 64), np.float32),
                                np.zeros((1, 2, 64, 64), np.float32))
    with mlflow.start_run():
        mlflow.pytorch.log_model(evil, name="evil", registered_model_name="evil",
                                 signature=signature, metadata=spec.to_metadata(),
                                 pip_requirements=["torch"], serialization_format="pickle")
    assert not marker.exists()                   # saving does not unpickle
    capsys.readouterr()
    out = tmp_path / "out"
    out.mkdir()
    code = run_predict("models:/evil/1", tracking, tiny_sites / "site-0", tmp_path / "state",
                       "--out", str(out))
    line = one_error(capsys.readouterr())
    assert code == 2 and "refused: it is a pickled module" in line, line
    assert not marker.exists() and not any(out.iterdir())


@pytest.mark.parametrize("network", ["3d_segmenter", "classifier"])
def test_a_network_its_metadata_does_not_describe_is_refused_before_reading(
        network, encoders, tiny_sites, tmp_path, capsys):
    """Segmentation metadata for the brain layout (2D, 64^2) on a 3D SwinUNETR, or on a
    classifier: refused from the version's signature, before a study is read."""
    from client.data.layout import load_layout
    from models.serving import servable
    from models.tasks import build

    if network == "3d_segmenter":
        model, _ = build("foundation_swin", {"weights": "swin-3d", "num_channels": 4,
                                             "image_size": 64, "spatial_dims": 3,
                                             "lora_rank": 2},
                         "segmentation", {}, foundation_dir=encoders)
        returns = (2, 64, 64, 64)
        expected = ["takes studies of shape [4, 64, 64, 64]",
                    "brain_mri_4seq (2d_slice) gives [4, 64, 64]"]
    else:
        cfg = load_experiment(["experiment=smoke", "task.image_size=64",
                               f"runs_dir={tmp_path / 'runs'}"])
        model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name,
                         cfg.task_options())
        returns = (3,)
        expected = ["returns [3] per study", "(voxel_softmax) says [2, 64, 64]"]
    spec = ServingSpec(layout=load_layout("brain_mri_4seq"),
                       class_names=SEGMENTATION_CLASS_NAMES, task="segmentation",
                       output="voxel_softmax", image_size=64)
    tracking = log_by_hand(servable(model).eval(), returns, spec, tmp_path)
    capsys.readouterr()                          # MLflow's own lines while registering
    out = tmp_path / "out"
    out.mkdir()
    code = run_predict("models:/hand/1", tracking, tiny_sites / "site-0", tmp_path / "state",
                       "--out", str(out))
    line = one_error(capsys.readouterr())
    assert code == 2 and all(e in line for e in expected), line
    assert not any(out.iterdir())


def test_only_pseudonyms_name_mask_files(tmp_path):
    """Keys become file names: one that is not a pseudonym (a path, a UID) writes nothing."""
    from collections import Counter

    from client.data.layout import load_layout
    from medfed.predict import PredictError
    from medfed.predict_masks import segment

    spec = ServingSpec(layout=load_layout("brain_mri_4seq"), class_names=SEGMENTATION_CLASS_NAMES,
                       task="segmentation", output="voxel_softmax", image_size=32)
    probs = np.random.default_rng(0).dirichlet([1, 1], size=(2, 32, 32)).astype(np.float32)
    batches = [(0, probs.transpose(0, 3, 1, 2))]                    # [2, 2, 32, 32]
    for bad in ("../../escaped", "1.2.840.113619.2.55.3"):
        with pytest.raises(PredictError, match="not a pseudonym"):
            segment(iter(batches), spec, ["0123456789abcdef", bad], tmp_path,
                    skipped=Counter(), files=2)
        assert not any(tmp_path.rglob("*"))
    result = segment(iter(batches), spec, ["0123456789abcdef", "fedcba9876543210"], tmp_path,
                     skipped=Counter(), files=2, min_voxels=10**6)
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == \
        ["0123456789abcdef.npy", "fedcba9876543210.npy"]
    assert result.predicted() == ["background", "background"]       # threshold not reached
    assert (result.voxels[:, 0] == (probs.argmax(-1) == 1).sum((1, 2))).all()
    assert (tmp_path / "predictions.csv").is_file()

    def failing():                  # a run that stops part-way (the model raises, OOM, ...)
        yield batches[0][0], batches[0][1][:1]
        raise PredictError("scoring failed")

    with pytest.raises(PredictError, match="scoring failed"):
        segment(failing(), spec, ["0123456789abcdef", "fedcba9876543210"], tmp_path,
                skipped=Counter(), files=2)
    # no CSV from the earlier run beside this run's partial masks: no CSV means not complete
    assert not (tmp_path / "predictions.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"]


def test_a_unetr_version_on_our_vit_serves_its_voxel_probabilities(tiny_sites, tmp_path):
    """The lesion_seg task's default network (UNETR on the multi-modal ViT) registers as a
    segmenter too: traced, served by the stock pyfunc, equal to the site evaluation's
    forward (it used to register the ViT's pooled features)."""
    from medfed.predict import load_version, read_studies, score_batches

    cfg = load_experiment(["task=lesion_seg", "task.image_size=64", "federation=sim2",
                           f"runs_dir={tmp_path / 'runs'}", "tracking.log_models=true"])
    model, uri, tracking = register(cfg, tmp_path)
    site_dir = tiny_sites / "site-0"
    key = site_key(tiny_sites / "site-0" / ".medfed")
    pyfunc, spec = load_version(uri, tracking)
    assert spec.output == "voxel_softmax" and spec.class_names == SEGMENTATION_CLASS_NAMES
    data, dataset = read_studies(site_dir, spec, key)
    got = {}
    for start, probs in score_batches(pyfunc, spec, dataset, batch=8):
        got |= {s.key: p for s, p in zip(data.studies[start:], probs)}
    expected = site_probabilities(model, site_dir, cfg, key)
    assert len(expected) >= 3 and set(expected) <= set(got)
    for k, probs in expected.items():
        np.testing.assert_allclose(got[k], probs, rtol=0, atol=ATOL)
