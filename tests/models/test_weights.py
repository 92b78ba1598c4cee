"""Architecture check of a pretrained backbone against the configured model."""

import pytest

from models.weights import PretrainedError, check_compatible

SAVED = {"spatial_dims": 2, "img_size": 64, "patch_size": 16, "num_sequences": 4, "dim": 64,
         "depth": 2, "heads": 4, "mlp_ratio": 2.0}      # saved before sequence_fusion existed


def test_a_config_saved_before_sequence_fusion_means_without_it():
    check_compatible({"config": SAVED}, SAVED | {"sequence_fusion": False})
    with pytest.raises(PretrainedError, match="sequence_fusion False .saved. != True"):
        check_compatible({"config": SAVED}, SAVED | {"sequence_fusion": True})


def test_any_architecture_difference_is_named():
    saved = {"config": SAVED | {"sequence_fusion": True}}
    check_compatible(saved, SAVED | {"sequence_fusion": True, "dropout": 0.1})   # not architecture
    with pytest.raises(PretrainedError, match="dim 64 .saved. != 32.*depth 2 .saved. != 1"):
        check_compatible(saved, SAVED | {"sequence_fusion": True, "dim": 32, "depth": 1})
