"""``medfed predict``: a registered version scores new studies with the layout and
preprocessing its metadata carries, exactly as a site evaluates (same readers, same
``StudyDataset`` transforms); one CSV row per study, no PHI, UID or path in it; bad input is
one clear error."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from flwr.app import ArrayRecord

from client.data.layout import load_layout
from client.data.pseudonyms import site_key
from client.runtime import SiteDataCache, SiteIdentity
from medfed.cli import main
from models.tasks import build
from protocol import wire
from protocol.serving import KEY_LAYOUT, KEY_PREPROCESSING, ServingSpec
from server.config import load_experiment
from strategies.observed import RoundRecord, SiteReply
from tests.conftest import phi_strings

ATOL = 1e-5


def register(cfg, tmp_path: Path, seed: int = 0):
    """Register one round's global model (a seeded, perturbed one) as the server does;
    ``(model, uri, tracking uri)``."""
    import mlflow

    from server.tracking import MlflowTracker

    torch.manual_seed(seed)
    model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options(),
                     foundation_dir=cfg.model.foundation_dir)
    with torch.no_grad():                  # a model whose outputs depend on the input
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    record = RoundRecord(round=1, train=[SiteReply("site-0", 1, {}, manifest="abc")],
                         arrays=ArrayRecord(model.state_dict()))
    tracker = MlflowTracker(cfg, tmp_path)
    try:
        tracker.on_train(record)
    finally:
        tracker.finish("")
        mlflow.end_run()
    return model, f"models:/{cfg.tracking.registered_model}/{tracker.versions[1]}", tracker.uri


def site_probabilities(model, site_dir: Path, cfg, key: bytes) -> dict[str, np.ndarray]:
    """Per labelled study: the probabilities a deployed site's evaluation computes (the
    ClientApp's data path: an external site's split from the site cache, pseudonyms under
    the site's ``key``; the evaluator's softmax)."""
    site = SiteIdentity("external", site_dir, torch.device("cpu"), wire.ROLE_EXTERNAL,
                        pseudonym_key=key)
    data, splits = SiteDataCache().get(site, tuple(cfg.task.class_names), cfg.task.image_size,
                                       layout=cfg.data.layout_spec())
    keys = [s.key for s in data.studies if s.label >= 0]
    dataset = splits[wire.EXTERNAL_SPLIT]
    with torch.no_grad():
        out = {}
        for key, i in zip(keys, range(len(dataset))):
            item = dataset[i]
            out[key] = model(item["image"][None], item["present"][None]).float().softmax(1)[0]
    return {k: v.numpy() for k, v in out.items()}


def secrets_of(site_dir: Path) -> set[str]:
    """PHI the generator wrote, every UID and file name of the site, and its path."""
    found = phi_strings(site_dir) | {str(site_dir), site_dir.name}
    for path in site_dir.rglob("*.dcm"):
        found.add(path.name)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - junk files are part of the fixture
            continue
        found |= {str(ds.get(t, "")) for t in ("StudyInstanceUID", "SeriesInstanceUID",
                                               "SOPInstanceUID")} - {""}
    return found


@pytest.fixture(scope="module")
def chest_site(tmp_path_factory) -> Path:
    from medfed.synth.chest import synthesize_chest

    root = tmp_path_factory.mktemp("chest") / "data"
    synthesize_chest(root, n_sites=1, seed=5, patients=10)
    return root / "site-0"


@pytest.fixture(scope="module")
def ct_site(tmp_path_factory) -> Path:
    from medfed.synth.ct import synthesize_ct

    root = tmp_path_factory.mktemp("ct") / "data"
    synthesize_ct(root, n_sites=1, seed=5, patients=6)
    return root / "site-0"


def registered_version(layout: str, out: Path):
    """``(cfg, model, uri, tracking uri)``: a smoke experiment's version for ``layout``
    (ct_volume: experiment=ct3, a 3D ViT)."""
    experiment = "ct3" if layout == "ct_volume" else "smoke"
    overrides = [f"experiment={experiment}", f"runs_dir={out / 'runs'}",
                 "tracking.log_models=true"]
    if layout == "chest_xray":
        overrides += ["data/layout=chest_xray", "task=chest3"]
    cfg = load_experiment(overrides)
    return cfg, *register(cfg, out)


@pytest.fixture(scope="module")
def brain_version(tmp_path_factory):
    return registered_version("brain_mri_4seq", tmp_path_factory.mktemp("brain-version"))


@pytest.mark.parametrize("layout", ["brain_mri_4seq", "chest_xray", "ct_volume"])
def test_predict_gives_the_site_evaluation_probabilities_and_no_phi(layout, tiny_sites,
                                                                     tmp_path, capsys, request):
    import mlflow

    if layout in ("chest_xray", "ct_volume"):
        cfg, model, uri, tracking = registered_version(layout, tmp_path)
        site_dir = request.getfixturevalue("chest_site" if layout == "chest_xray" else "ct_site")
    else:
        cfg, model, uri, tracking = request.getfixturevalue("brain_version")
        site_dir = tiny_sites / "site-0"

    # the version carries its layout (the default one too), preprocessing and class names
    mlflow.set_tracking_uri(tracking)
    info = mlflow.models.get_model_info(uri)
    spec = ServingSpec.from_metadata(info.metadata)
    # the composed layout (experiment=ct3 puts ct_volume's grid at 32^3, 4 mm, and reads a
    # liver window instead of the lung one)
    composed = cfg.data.layout_spec() or load_layout(layout)
    assert info.metadata[KEY_LAYOUT] == composed.to_dict()
    assert spec.class_names == tuple(cfg.task.class_names)
    assert info.metadata[KEY_PREPROCESSING]["channels"] == list(composed.input_channels)
    # the signature: one tensor [B, *preprocessed study] -> [B, classes]
    assert info.signature.inputs.inputs[0].shape == (-1, *spec.preprocessing()["input_shape"])
    assert info.signature.outputs.inputs[0].shape == (-1, len(spec.class_names))

    out = tmp_path / "predictions.csv"
    code = main(["predict", "--model", uri, "--data-dir", str(site_dir), "--tracking-uri",
                 tracking, "--out", str(out), "--privacy-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 0, err
    rows = list(csv.DictReader(out.open()))
    names = tuple(cfg.task.class_names)
    assert list(rows[0]) == ["study_key", *(f"p_{n}" for n in names), "predicted"]
    got = {r["study_key"]: np.array([float(r[f"p_{n}"]) for n in names]) for r in rows}
    assert len(got) == len(rows) and f"predicted {len(rows)} studies" in err

    key = site_key(tmp_path / "state")         # the one predict made, 0600
    expected = site_probabilities(model, site_dir, cfg, key)
    assert len(expected) >= 3 and set(expected) <= set(got)    # unlabelled studies too
    for key, probs in expected.items():
        np.testing.assert_allclose(got[key], probs, rtol=0, atol=ATOL)
    # the inputs matter (synthetic CT studies share their anatomy: a random 3D model's
    # outputs differ less between them, ~1e-3, than between radiographs or brain MRIs)
    atol = 1e-4 if layout == "ct_volume" else 1e-3
    # (over all studies: two chosen by their random pseudonyms can sit closer than that)
    assert np.ptp(np.stack(list(expected.values())), axis=0).max() > atol
    assert all(r["predicted"] == names[int(np.argmax(got[r["study_key"]]))] for r in rows)

    secrets = secrets_of(site_dir)
    assert len(secrets) > 20
    for blob in (out.read_text(), err):
        leaked = [s for s in secrets if s in blob]
        assert not leaked, f"{leaked[:3]} leaked"


def test_a_version_without_layout_metadata_is_one_clear_error(tiny_sites, tmp_path, capsys):
    """A version registered before the metadata existed (here: logged without it)."""
    import mlflow

    from models.serving import servable

    cfg = load_experiment(["experiment=smoke", f"runs_dir={tmp_path / 'runs'}"])
    model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options())
    exported = servable(model).eval()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    with mlflow.start_run():
        mlflow.pytorch.log_model(exported, name="old", registered_model_name="old-model",
                                 input_example=np.zeros((2, *exported.input_shape), np.float32),
                                 pip_requirements=["torch"])
    capsys.readouterr()                          # MLflow's own lines while registering
    code = main(["predict", "--model", "models:/old-model/1", "--data-dir",
                 str(tiny_sites / "site-0"), "--tracking-uri", tracking,
                 "--privacy-dir", str(tmp_path / "state")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    errors = [line for line in captured.err.splitlines() if line.startswith("medfed: error")]
    assert len(errors) == 1 and "carries no MedFed layout/preprocessing metadata" in errors[0]
    assert "Traceback" not in captured.err


def test_a_data_folder_without_a_readable_study_exits_2(brain_version, tmp_path, capsys):
    _, _, uri, tracking = brain_version
    site = tmp_path / "site"
    (site / "dicom").mkdir(parents=True)
    (site / "dicom" / "junk.dcm").write_bytes(b"not a dicom file")
    out = tmp_path / "out.csv"
    code = main(["predict", "--model", uri, "--data-dir", str(site), "--tracking-uri", tracking,
                 "--out", str(out), "--privacy-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 2 and "no usable studies" in err and not out.exists()
    code = main(["predict", "--model", "models:/nope/1", "--data-dir", str(site),
                 "--tracking-uri", tracking, "--privacy-dir", str(tmp_path / "state")])
    assert code == 2 and "cannot load models:/nope/1" in capsys.readouterr().err


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"/"
            for p in sorted(folder.rglob("*"))}


def test_a_refused_out_leaves_the_site_folder_as_it_was(brain_version, tmp_path, capsys):
    """Every ``--out`` refusal comes before the site's pseudonym key is created (its default
    place is ``<data-dir>/.medfed``): an operator's typo leaves no new secret behind."""
    _, _, uri, tracking = brain_version
    site = tmp_path / "site"
    (site / "dicom").mkdir(parents=True)
    (site / "dicom" / "junk.dcm").write_bytes(b"not a dicom file")
    existing = tmp_path / "earlier.csv"
    existing.write_text("earlier predictions\n")
    before = _tree(site)
    for out, message in ((existing, "exists; pass --force"),
                         (tmp_path / "nowhere" / "out.csv", "its folder does not exist"),
                         (tmp_path, "is a folder")):
        code = main(["predict", "--model", uri, "--data-dir", str(site), "--tracking-uri",
                     tracking, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert _tree(site) == before, f"--out {out.name}: the site folder changed"
    assert existing.read_text() == "earlier predictions\n"
    assert not (tmp_path / "nowhere").exists()
