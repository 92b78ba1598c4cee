"""``_serving_spec``: a SwinUNETR segmenter's version records a per-voxel output (background /
lesion) when its input shape is what the layout's preprocessing gives, and nothing (with a
warning) when it is not, as for classifiers."""

from __future__ import annotations

import logging

from models.foundation.swin import SEGMENT_CLASSES
from models.serving import servable
from models.tasks import build
from protocol.serving import SEGMENTATION_CLASS_NAMES
from server.versions import _serving_spec
from tests.medfed.test_predict_segmentation import encoders, swin_config  # noqa: F401


def _segmenter(encoders, weights: str, **options):
    model, _ = build("foundation_swin", {"weights": weights, "num_channels": 4, "lora_rank": 2}
                     | options, "segmentation", {}, foundation_dir=encoders)
    return servable(model).eval()


def test_a_segmenter_version_records_a_voxel_output(encoders, tmp_path):  # noqa: F811
    cfg = swin_config(encoders, tmp_path / "runs")
    spec = _serving_spec(cfg, _segmenter(encoders, "swin-2d", image_size=64),
                         multi_label=False)
    assert spec is not None and spec.segmentation and spec.task == "segmentation"
    # the network's own classes, not the task's study classes (glioma grades)
    assert spec.class_names == SEGMENTATION_CLASS_NAMES and len(spec.class_names) == \
        SEGMENT_CLASSES
    assert spec.output_shape() == (2, 64, 64)


def test_a_segmenter_the_layout_cannot_feed_records_nothing(encoders, tmp_path,  # noqa: F811
                                                            caplog):
    cfg = swin_config(encoders, tmp_path / "runs")            # brain_mri_4seq: 2D, 64^2
    volume = _segmenter(encoders, "swin-3d", image_size=64, spatial_dims=3)
    with caplog.at_level(logging.WARNING, logger="server.versions"):
        assert _serving_spec(cfg, volume, multi_label=False) is None
    assert "the model takes (4, 64, 64, 64) per study, the layout's preprocessing gives " \
           "(4, 64, 64)" in caplog.text


def test_a_unetr_version_on_our_vit_records_a_voxel_output(tmp_path):
    from server.config import load_experiment

    cfg = load_experiment(["task=lesion_seg", "task.image_size=64", "federation=sim2",
                           f"runs_dir={tmp_path / 'runs'}"])
    model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options())
    spec = _serving_spec(cfg, servable(model).eval(), multi_label=False)
    assert spec is not None and spec.output == "voxel_softmax"
    assert spec.class_names == SEGMENTATION_CLASS_NAMES and spec.output_shape() == (2, 64, 64)
