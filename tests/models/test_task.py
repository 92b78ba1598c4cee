"""The task contract (models/task.py): every registered task/objective is a ``Task`` with its
optional parts declared, not probed, and says what data it needs in one hashable
``DataNeeds`` - the site's data cache key."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from torch import nn

from models import TASKS
from models.serving import plain_backbone
from models.task import UNDECLARED_COUPLING, DataNeeds, ReportText, Task, TaskBase, TaskModel
from models.tasks import batch_coupling, build
from models.text import DEFAULT_TOKENIZER_DIR
from models.vit import MultiModalViT, ViTConfig

TINY = {"dim": 32, "depth": 1, "heads": 2, "img_size": 32, "patch_size": 8, "num_classes": 3}
# Every task the project registers (tests may register throwaway ones elsewhere).
PROJECT_TASKS = [n for n in TASKS.names() if TASKS.factory(n).__module__.startswith("models.")]


def test_the_registry_lists_every_project_task():
    assert set(PROJECT_TASKS) == {"classification", "clip", "mae", "mm_dino", "multilabel",
                                  "segmentation"}


@pytest.mark.parametrize("name", PROJECT_TASKS)
def test_every_registered_task_satisfies_the_protocol(name):
    factory = TASKS.factory(name)
    assert issubclass(factory, TaskBase)
    task = TASKS.build(name, {})
    assert isinstance(task, Task)
    # the optional hooks are declared and callable on every task, whether it uses them or not
    assert callable(task.set_label_prior) and callable(task.after_step)
    assert type(task).batch_coupling is None or isinstance(type(task).batch_coupling, str)
    needs = task.data_needs
    assert isinstance(needs, DataNeeds)
    hash(needs)                                          # usable as a cache key
    assert needs == TASKS.build(name, {}).data_needs     # a function of the config only
    assert needs.unlabelled == factory.uses_unlabelled   # what the server validates, by class


def test_what_each_task_needs():
    needs = {name: TASKS.build(name, {}).data_needs for name in PROJECT_TASKS}
    assert needs["classification"] == DataNeeds()
    assert needs["multilabel"] == DataNeeds(multi_label=True)
    assert needs["segmentation"] == DataNeeds(masks=True)
    assert needs["mae"] == needs["mm_dino"] == DataNeeds(unlabelled=True)
    assert needs["clip"].unlabelled and needs["clip"].reports is not None
    assert needs["clip"].reports.max_length == TASKS.config("clip").max_length
    # label_fraction reaches the needs of every task that takes it (MM-DINOv2 once kept its
    # own option and the site read the default 1.0)
    for name in ("classification", "multilabel", "segmentation", "mm_dino"):
        assert TASKS.build(name, {"label_fraction": 0.25}).data_needs.label_fraction == 0.25


def test_an_object_without_the_members_is_not_a_task():
    class Bare:
        def __init__(self, config):
            self.config = config

        def step(self, model, batch):
            return None

    assert not isinstance(Bare(None), Task)


def test_defaults_of_the_optional_parts_are_no_ops():
    class Minimal(TaskBase):
        def __init__(self, config):
            self.config = config

    task, model = Minimal(None), nn.Linear(2, 2)
    assert isinstance(task, Task)
    assert task.wrap(model) is model
    assert task.set_label_prior(torch.tensor([0, 1])) is None
    assert task.after_step(model) is None
    assert task.site_state() is None
    assert task.data_needs == DataNeeds()
    with pytest.raises(ValueError, match="keeps no site state"):
        task.load_site_state(model, {"x": torch.zeros(1)})
    with pytest.raises(NotImplementedError):
        task.step(model, {})
    with pytest.raises(NotImplementedError):
        task.evaluator()
    # undeclared coupling is coupled: a task has to opt in to DP-SGD
    assert Minimal.batch_coupling == UNDECLARED_COUPLING


def test_batch_coupling_reads_the_declaration_and_the_options():
    assert batch_coupling("classification") is None
    assert "feature_decorrelation" in batch_coupling("classification",
                                                     {"feature_decorrelation": 0.1})
    assert "batch" in batch_coupling("clip") and "batch" in batch_coupling("mm_dino")
    assert batch_coupling("mae") is None and batch_coupling("multilabel") is None


def test_data_needs_are_hashable_frozen_and_validated():
    needs = DataNeeds(masks=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        needs.masks = False
    assert len({DataNeeds(), DataNeeds(), needs, DataNeeds(label_fraction=0.5)}) == 3
    with pytest.raises(ValueError, match="label_fraction"):
        DataNeeds(label_fraction=0.0)


def test_report_text_identity_is_tokenizer_file_and_length(tmp_path):
    base = ReportText.of(None, 128)
    assert base == ReportText.of(None, 128)
    assert base != ReportText.of(None, 64)                  # another length: another key
    copy = tmp_path / "tok"
    shutil.copytree(DEFAULT_TOKENIZER_DIR, copy)
    same_file = ReportText.of(str(copy), 128)
    assert same_file.fingerprint == base.fingerprint and same_file != base   # dir is part too
    out = base.transform()(["ring enhancement", ""])
    assert out["input_ids"].shape == (2, 128)
    assert ReportText.of(None, 16).transform()(["ring enhancement"])["input_ids"].shape == (1, 16)
    # the tokenizer file changed under the same directory: refuse rather than mix
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text() + " ")
    with pytest.raises(ValueError, match="tokenizer changed"):
        same_file.transform()


def test_clip_tokenizes_reports_as_its_data_needs_say():
    task = TASKS.build("clip", {"max_length": 24})
    texts = ["1.2 cm ring enhancing lesion in the right frontal lobe.", ""]
    expected = task.tokenize(texts)
    got = task.data_needs.reports.transform()(texts)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key])


@pytest.mark.parametrize("name", PROJECT_TASKS)
def test_export_finds_the_backbone_by_type(name):
    torch.manual_seed(0)
    model, _ = build("mmvit", TINY, name, {})
    assert isinstance(model, (MultiModalViT, TaskModel))
    assert isinstance(plain_backbone(model), MultiModalViT)


def test_export_refuses_a_model_without_a_declared_backbone():
    class Holder(nn.Module):                 # has a .backbone, but does not declare it
        def __init__(self):
            super().__init__()
            self.backbone = MultiModalViT(ViTConfig(**TINY))

    with pytest.raises(TypeError, match="no multi-modal ViT backbone"):
        plain_backbone(Holder())


def test_a_steps_chunks_merge_into_means_over_all_their_samples():
    """DP-SGD's physical chunks of one step: loss and metrics are means weighted by each
    chunk's ``n``; a metric a chunk lacks is averaged over the chunks that have it, and a
    chunk with no samples (e.g. no masked study) weighs nothing."""
    import torch

    from models.task import StepOutput

    merged = StepOutput.merge([StepOutput(torch.tensor(1.0), 3, {"a": 1.0, "b": 2.0}),
                               StepOutput(torch.tensor(4.0), 1, {"a": 5.0}),
                               StepOutput(torch.tensor(9.0), 0, {"a": 7.0})])
    assert merged.n == 4 and float(merged.loss) == 1.75
    assert merged.metrics == {"a": 2.0, "b": 2.0}
    assert StepOutput.merge([]) is None
