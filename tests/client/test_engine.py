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
    first = engine.evaluate(model, ds)
    assert first.n == 8 and first.confusion.sum() == 8 and first.seconds > 0
    before = first.loss
    engine.fit(model, ds, TrainConfig(local_epochs=30, batch_size=8, lr=3e-3, weight_decay=0.0))
    after = engine.evaluate(model, ds).loss
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


def test_logit_adjustment_trains_on_logits_plus_the_sites_log_prior(tiny_sites):
    import torch.nn.functional as F

    data = load_site(tiny_sites / "site-0", CLASSES)
    ds = StudyDataset(data.split("train", labelled_only=True)[:8], image_size=64)
    labels = ds.labels
    assert labels.shape == (8,) and labels.min() >= 0
    task = TASKS.build("classification", {"logit_adjustment": 0.5})
    torch.manual_seed(0)
    model = MODELS.build("mmvit", {"dim": 32, "depth": 1, "heads": 2})
    engine = Engine(task, torch.device("cpu"))
    engine.fit(model, ds, TrainConfig(local_epochs=1, batch_size=8))
    counts = torch.bincount(labels, minlength=3).double() + 1          # set from this site
    torch.testing.assert_close(task.log_prior, (counts / counts.sum()).log().float())

    batch = {k: torch.stack([ds[i][k] for i in range(8)]) for k in ("image", "present", "label")}
    model.eval()
    with torch.no_grad():
        logits = model(batch["image"], batch["present"]).float()
    want = F.cross_entropy(logits + 0.5 * task.log_prior, batch["label"])
    model.train()                                        # the adjustment applies in training
    with torch.no_grad():
        got = task.step(model, batch).loss
    torch.testing.assert_close(got, want)
    evaluator = task.evaluator()                                          # prediction: raw
    evaluator.update(model.train(False), batch)
    raw = F.cross_entropy(logits, batch["label"])
    assert evaluator.compute().loss == pytest.approx(float(raw), rel=1e-6)
    assert not torch.allclose(raw, want)


def test_logit_adjustment_needs_the_prior_and_a_non_negative_tau():
    with pytest.raises(ValueError, match="logit_adjustment must be >= 0"):
        TASKS.build("classification", {"logit_adjustment": -1.0})
    task = TASKS.build("classification", {"logit_adjustment": 1.0})
    model = MODELS.build("mmvit", {"dim": 32, "depth": 1, "heads": 2, "img_size": 32})
    batch = {"image": torch.zeros(2, 4, 32, 32), "present": torch.ones(2, 4, dtype=torch.bool),
             "label": torch.tensor([0, 1])}
    with pytest.raises(RuntimeError, match="set_label_prior"):
        task.step(model.train(), batch)
    task.set_label_prior(torch.tensor([0, 0, 0, -1]))    # unlabelled ignored, add-one smoothed
    torch.testing.assert_close(task.log_prior.exp(), torch.tensor([4 / 6, 1 / 6, 1 / 6]))


def test_decorrelation_loss_is_one_over_d_when_uncorrelated_and_one_when_collapsed():
    from models.tasks import decorrelation_loss

    torch.manual_seed(0)
    centred = torch.randn(64, 8, dtype=torch.float64)
    spread = torch.linalg.qr(centred - centred.mean(0))[0]        # centred, orthogonal columns
    assert abs(decorrelation_loss(spread).item() - 1 / 8) < 1e-3
    one_way = torch.randn(64, 1) * torch.linspace(1, 2, 8)         # every dim the same direction
    assert abs(decorrelation_loss(one_way).item() - 1.0) < 1e-4
    features = (torch.randn(32, 8) + torch.randn(32, 1) * 3).requires_grad_()
    before = decorrelation_loss(features)
    before.backward()
    after = decorrelation_loss(features.detach() - 0.5 * features.grad)
    assert after < before                            # its gradient decorrelates the features


def test_feature_decorrelation_adds_the_penalty_on_pooled_features_in_training_only(tiny_sites):
    import torch.nn.functional as F

    from models.tasks import decorrelation_loss

    data = load_site(tiny_sites / "site-0", CLASSES)
    ds = StudyDataset(data.split("train", labelled_only=True)[:8], image_size=64)
    batch = {k: torch.stack([ds[i][k] for i in range(8)]) for k in ("image", "present", "label")}
    torch.manual_seed(0)
    model = MODELS.build("mmvit", {"dim": 32, "depth": 1, "heads": 2})
    plain = TASKS.build("classification", {})
    task = TASKS.build("classification", {"feature_decorrelation": 0.3})
    with torch.no_grad():
        features = model.pool(model.forward_features(batch["image"], batch["present"]),
                              batch["present"])
        want = F.cross_entropy(model.head(features), batch["label"]) \
            + 0.3 * decorrelation_loss(features)
        torch.testing.assert_close(task.step(model.train(), batch).loss, want)
        assert task.step(model, batch).loss > plain.step(model, batch).loss
        torch.testing.assert_close(task.step(model.eval(), batch).loss,      # eval: no penalty
                                   plain.step(model, batch).loss)
        one = {k: v[:1] for k, v in batch.items()}            # a batch of one has no correlation
        torch.testing.assert_close(task.step(model.train(), one).loss,
                                   plain.step(model, one).loss)
    with pytest.raises(ValueError, match="feature_decorrelation must be >= 0"):
        TASKS.build("classification", {"feature_decorrelation": -0.1})


@pytest.mark.parametrize("private", [False, True], ids=["sgd", "dp-sgd"])
def test_head_lr_gives_the_class_head_its_own_rate(tiny_sites, private):
    from client.privacy.dpsgd import DPSGDConfig

    data = load_site(tiny_sites / "site-0", CLASSES)
    ds = StudyDataset(data.split("train", labelled_only=True)[:8], image_size=64)
    torch.manual_seed(0)
    model = MODELS.build("mmvit", {"dim": 32, "depth": 1, "heads": 2})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = Engine(TASKS.build("classification", {}), torch.device("cpu"))
    privacy = (DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0,
                           secure_mode=False) if private else None)
    engine.fit(model, ds, TrainConfig(local_epochs=1, batch_size=8, lr=1e-4, head_lr=1e-2,
                                      weight_decay=0.0), privacy=privacy)
    # One AdamW step moves each coordinate by at most its group's rate (~the rate exactly
    # where the gradient is not tiny against eps).
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    head = max(v for n, v in moved.items() if n.startswith("head."))
    body = max(v for n, v in moved.items() if not n.startswith("head."))
    assert head == pytest.approx(1e-2, rel=1e-2)
    assert body == pytest.approx(1e-4, rel=1e-2)


@pytest.mark.parametrize("setting", [{"head_lr": 1e-2}, {"head_only": True}],
                         ids=["head_lr", "head_only"])
def test_head_settings_are_refused_for_a_model_whose_head_does_not_train(tiny_sites, setting):
    data = load_site(tiny_sites / "site-0", CLASSES)
    ds = StudyDataset(data.split("train", labelled_only=True)[:4], image_size=64)
    model = MODELS.build("mmvit", {"dim": 32, "depth": 1, "heads": 2})
    model.head.requires_grad_(False)
    engine = Engine(TASKS.build("classification", {}), torch.device("cpu"))
    name = "head_lr" if "head_lr" in setting else "head_only_rounds"
    with pytest.raises(ValueError,
                       match=f"train.{name} is set but this MultiModalViT has no class head"):
        engine.fit(model, ds, TrainConfig(lr=1e-3, **setting))
    assert model.blocks[0].attn.qkv.weight.requires_grad    # nothing left paused
    engine.fit(model, ds, TrainConfig(lr=1e-3))     # without the setting the same model trains


@pytest.mark.parametrize("private,share", [(False, None), (True, None), (True, 0.5)],
                         ids=["sgd", "dp-sgd", "dp-sgd-per-group"])
def test_a_head_only_round_trains_the_head_alone_and_returns_the_rest_as_received(
        tiny_sites, private, share):
    """``train.head_only_rounds``: in such a round every other trainable tensor comes back
    bit for bit (DP-SGD neither clips nor noises it), the head moves, and afterwards the
    model trains whole again (the pause is undone)."""
    from client.privacy.dpsgd import DPSGDConfig

    data = load_site(tiny_sites / "site-0", CLASSES)
    ds = StudyDataset(data.split("train", labelled_only=True)[:8], image_size=64)
    torch.manual_seed(0)
    model = MODELS.build("mmvit", {"dim": 32, "depth": 1, "heads": 2})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = Engine(TASKS.build("classification", {}), torch.device("cpu"))
    privacy = (DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0,
                           secure_mode=False, head_clip_share=share) if private else None)
    engine.fit(model, ds, TrainConfig(local_epochs=1, batch_size=8, lr=1e-2, head_only=True),
               privacy=privacy)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"head.weight", "head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    engine.fit(model, ds, TrainConfig(local_epochs=1, batch_size=8, lr=1e-2), privacy=privacy)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert len(changed) > 2 and not changed - trainable


@pytest.mark.parametrize("private", [False, True], ids=["sgd", "dp-sgd"])
def test_pseudo_labels_come_from_the_received_model_before_training(tiny_sites, private):
    """The engine asks the task for the round's training data once, before the first step,
    from the model as received (eval mode, no graph); the steps then see its labels."""
    from client.privacy.dpsgd import DPSGDConfig
    from client.runtime import label_subset
    from models.tasks import ClassificationConfig, ClassificationTask

    data = load_site(tiny_sites / "site-0", CLASSES)
    studies = label_subset(data.split("train", labelled_only=False), 0.5, keep_unlabelled=True)
    ds = StudyDataset(studies, image_size=64)
    assert (ds.labels < 0).any() and (ds.labels >= 0).any()
    torch.manual_seed(0)
    model = MODELS.build("mmvit", {"dim": 32, "depth": 1, "heads": 2})
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 20.0]))   # sure of class 2 everywhere
    received = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {"calls": [], "labels": []}

    class Spy(ClassificationTask):
        def training_data(self, model, data, batch_size):
            state = model.state_dict()
            seen["calls"].append((model.training, torch.is_grad_enabled(),
                                  all(torch.equal(state[k], v) for k, v in received.items())))
            return super().training_data(model, data, batch_size)

        def step(self, model, batch):
            seen["labels"].append(batch["label"].clone())
            assert "label_weight" in batch
            return super().step(model, batch)

    task = Spy(ClassificationConfig(pseudo_label_threshold=0.9))
    privacy = (DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                           secure_mode=False) if private else None)
    Engine(task, torch.device("cpu")).fit(model, ds, TrainConfig(local_epochs=2, batch_size=8),
                                          privacy=privacy)
    assert seen["calls"] == [(False, False, True)]
    labels = torch.cat(seen["labels"])
    assert (labels == 2).sum() > (ds.labels == 2).sum() * 2 and (labels >= 0).all()
