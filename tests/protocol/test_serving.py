"""The serving spec a registered version carries: it round-trips through its metadata form,
and a version without it, with another preprocessing record or a tampered layout is refused
with one reason."""

from __future__ import annotations

import json

import pytest

from client.data.layout import load_layout
from protocol.serving import (KEY_LAYOUT, KEY_PREPROCESSING, METADATA_KEYS, ServingSpec,
                              ServingSpecError)


def spec(layout="brain_mri_4seq", **kw) -> ServingSpec:
    layout = load_layout(layout) if isinstance(layout, str) else layout
    return ServingSpec(**{"layout": layout, "class_names": ("a", "b", "c"),
                          "task": "classification", "output": "softmax", "image_size": 64}
                       | kw)


@pytest.mark.parametrize("layout", ["brain_mri_4seq", "chest_xray", "mammography"])
def test_the_metadata_form_round_trips_through_json(layout):
    s = spec(layout)
    meta = json.loads(json.dumps(s.to_metadata()))          # what MLmodel stores and returns
    assert set(meta) == set(METADATA_KEYS)
    assert ServingSpec.from_metadata(meta) == s


def test_the_default_layout_is_read_by_the_default_reader_and_z_scored():
    brain, chest = spec(), spec("chest_xray")
    assert brain.site_layout is None and brain.zscore
    assert brain.channels == ("T1", "T1ce", "T2", "FLAIR")
    assert chest.site_layout == load_layout("chest_xray") and not chest.zscore
    assert brain.preprocessing()["input_shape"] == [4, 64, 64]
    assert "zscore" in brain.preprocessing()["normalization"]


def test_ct_windows_are_recorded_per_channel():
    from protocol.layout import Layout

    raw = load_layout("ct_volume").to_dict() | {"dims": "2d_slice", "size": None,
                                                "spacing": None}
    s = spec(layout=Layout.from_dict(raw))
    windows = [c for c in s.preprocessing()["intensity"].values() if "windows_hu" in c]
    assert windows and all(w["width"] > 0 for c in windows for w in c["windows_hu"])
    assert len(s.channels) == sum(len(c["windows_hu"]) for c in windows) + \
        sum("windows_hu" not in c for c in s.preprocessing()["intensity"].values())


def test_a_version_without_metadata_is_refused_with_the_reason():
    with pytest.raises(ServingSpecError, match="no MedFed layout/preprocessing metadata"):
        ServingSpec.from_metadata({"foundation_family": "dinov2"})
    with pytest.raises(ServingSpecError, match="no MedFed layout"):
        ServingSpec.from_metadata(None)


def test_another_preprocessing_record_is_refused():
    meta = spec().to_metadata()
    meta[KEY_PREPROCESSING] = dict(meta[KEY_PREPROCESSING], resize="bilinear")
    with pytest.raises(ServingSpecError, match="differs from what this MedFed applies"):
        ServingSpec.from_metadata(meta)
    meta = spec().to_metadata()
    meta[KEY_PREPROCESSING] = dict(meta[KEY_PREPROCESSING], version=99)
    with pytest.raises(ServingSpecError, match="preprocessing version 99"):
        ServingSpec.from_metadata(meta)


def test_a_tampered_layout_is_revalidated_as_data():
    meta = spec("chest_xray").to_metadata()
    meta[KEY_LAYOUT] = dict(meta[KEY_LAYOUT], exec="import os")
    with pytest.raises(ServingSpecError, match="unknown key 'exec'"):
        ServingSpec.from_metadata(meta)
    meta = spec("chest_xray").to_metadata()
    meta[KEY_LAYOUT] = dict(meta[KEY_LAYOUT], dims="3d", size=[8, 8, 8])
    with pytest.raises(ServingSpecError):
        ServingSpec.from_metadata(meta)


def test_invalid_specs_are_refused():
    with pytest.raises(ServingSpecError, match="distinct"):
        spec(class_names=("a", "a"))
    with pytest.raises(ServingSpecError, match="output"):
        spec(output="logits")


def test_a_segmentation_spec_gives_a_mask_per_study_and_round_trips():
    from protocol.serving import SEGMENTATION_CLASS_NAMES

    seg = spec(class_names=SEGMENTATION_CLASS_NAMES, task="segmentation",
               output="voxel_softmax")
    assert seg.segmentation and not spec().segmentation
    assert seg.output_shape() == (2, 64, 64) and spec().output_shape() == (3,)
    ct = spec(layout="ct_volume", class_names=SEGMENTATION_CLASS_NAMES, output="voxel_softmax",
              image_size=32)
    assert ct.output_shape() == (2, 32, 32, 32)
    meta = json.loads(json.dumps(seg.to_metadata()))
    assert ServingSpec.from_metadata(meta) == seg
    with pytest.raises(ServingSpecError, match="a background and at least one other class"):
        spec(class_names=("background",), output="voxel_softmax")
