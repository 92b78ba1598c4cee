import pytest
import torch

from client.data.dataset import StudyDataset
from client.data.site import load_site
from client.engine import Engine, TrainConfig, resolve_device
from models import MODELS, TASKS
from tests.conftest import CLASSES


def test_loss_decreases_on_a_tiny_batch(tiny_sites):
    data = load_site(tiny_sites / "site-0", CLASSES)
    ds = StudyDataset(data.split("train", labelled_only=True)[:8], image_size=64)
    torch.manual_seed(0)
    model = MODELS.build("mmvit", {"dim": 32, "depth": 1, "heads": 2})
    engine = Engine(TASKS.build("classification", {}), torch.device("cpu"))
    before = engine.evaluate(model, ds)["loss"]
    engine.fit(model, ds, TrainConfig(local_epochs=30, batch_size=8, lr=3e-3, weight_decay=0.0))
    after = engine.evaluate(model, ds)["loss"]
    assert after < 0.5 * before


def test_device_resolution():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")


def test_empty_training_set_is_an_error():
    engine = Engine(TASKS.build("classification", {}), torch.device("cpu"))
    with pytest.raises(ValueError, match="no training samples"):
        engine.fit(MODELS.build("mmvit", {"dim": 32, "depth": 1, "heads": 2}), [], TrainConfig())
