"""Layout schema: shipped layouts load, brain_mri_4seq matches exactly like sequences.py,
and a broken layout fails with one message naming the problem."""

from __future__ import annotations

import itertools
import random

import pytest
import yaml

from client.data.layout import (LAYOUT_DIR, Layout, LayoutError, load_layout,
                                shipped_layouts)
from client.data.matching import Match, SeriesHeader, match_series
from client.data.sequences import sequence_of
from medfed.synth.sites import SERIES_NAMING


def _base(**over) -> dict:
    raw = {"name": "x", "dims": "2d",
           "channels": [{"name": "a", "rules": [{"modality": "CR"}], "intensity": "xray"}]}
    return raw | over


def test_shipped_layouts_load():
    assert set(shipped_layouts()) >= {"brain_mri_4seq", "chest_xray", "ct_volume", "mammography"}
    for name in shipped_layouts():
        assert load_layout(name).name == name       # file name and layout name agree
    ct = load_layout("ct_volume")
    assert ct.dims == "3d" and ct.input_channels == ("ct:soft_tissue", "ct:lung", "ct:bone")
    assert [(w.center, w.width) for w in ct.channels[0].intensity.windows] == \
        [(40, 400), (-600, 1500), (400, 1800)]
    mammo = load_layout("mammography")
    assert mammo.channel_names == ("L_CC", "L_MLO", "R_CC", "R_MLO")
    assert load_layout("chest_xray").report


def test_a_user_yaml_file_loads(tmp_path):
    path = tmp_path / "knee.yaml"
    path.write_text(yaml.safe_dump(_base(name="knee")))
    assert load_layout(str(path)).name == "knee"
    with pytest.raises(LayoutError, match="unknown layout 'knee'.*chest_xray"):
        load_layout("knee")                          # a bare name is a shipped layout


def _header(description: str, protocol: str = "") -> SeriesHeader:
    return SeriesHeader(study_key="s", series_key="r", modality="MR", description=description,
                        protocol=protocol)


def test_brain_layout_matches_exactly_like_sequences_py():
    """The shipped YAML must reproduce sequence_of on every description: vendor namings,
    tricky ones, and random token soups (both passes, SeriesDescription then ProtocolName)."""
    layout = load_layout("brain_mri_4seq")
    texts = [d for naming in SERIES_NAMING for d in naming.values()]
    texts += ["", "LOCALIZER", "t1 flair", "T1 MPRAGE POST", "t1ce", "T1_CE", "sag t1 +c",
              "ax t2 flair gd", "Dark Fluid", "T2*", "dwi", "t1_mprage_post", "T1 ce", "DTI"]
    tokens = ["t1", "t2", "flair", "post", "gd", "ce", "ax", "+c", "tirm", "dark_fluid",
              "contrast", "se", "_ce", "mprage_post", "dwi", " ", "T1", "FLAIR"]
    rng = random.Random(0)
    texts += ["".join(rng.choice(tokens) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    checked = 0
    for description, protocol in itertools.product(texts[:60], texts[:60]):
        expected = sequence_of(description, protocol)
        got = match_series(layout, _header(description, protocol))
        assert (got.channel if isinstance(got, Match) else None) == expected, \
            (description, protocol)
        checked += 1
    for description in texts:
        got = match_series(layout, _header(description))
        assert (got.channel if isinstance(got, Match) else None) == sequence_of(description)
    assert checked == 3600


@pytest.mark.parametrize("raw, message", [
    (_base(colour="red"), r"unknown key 'colour'; known: name, dims, channels"),
    (_base(dims="4d"), r"dims: '4d' is not one of 2d, 2d_slice, 3d"),
    (_base(channels=[{"name": "a", "rules": [{"modality": "CR", "ViewPos": "PA"}]}]),
     r"unknown key 'ViewPos'; known: name, modality, sop_class_uid, description"),
    (_base(channels=[{"name": "ct", "rules": [{"modality": "CT"}],
                      "intensity": {"kind": "ct_window",
                                    "windows": [{"name": "w", "center": 40, "width": 0}]}}]),
     r"window 'w' has width 0; a window's width must be > 0"),
    (_base(channels=[{"name": "ct", "rules": [{"modality": "CT"}],
                      "intensity": {"kind": "ct_window",
                                    "windows": [{"name": "w", "center": 40, "width": -5}]}}]),
     r"width must be > 0"),
    (_base(channels=[{"name": "a", "rules": [{}]}]), r"a rule needs at least one condition"),
    (_base(channels=[{"name": "a", "rules": [{"name": "only_a_name"}]}]),
     r"a rule needs at least one condition"),
    (_base(channels=[{"name": "a", "rules": []}]), r"no rule can select a series"),
    (_base(channels=[{"name": "a"}]), r"no rule can select a series"),
    (_base(channels=[{"name": "a", "rules": [{"modality": []}]}]),
     r"an empty list selects no series"),
    (_base(channels=[{"name": "a", "rules": [{"modality": "CR"}]},
                     {"name": "a", "rules": [{"modality": "DX"}]}]),
     r"duplicate channel name 'a'"),
    (_base(channels=[{"name": "a", "rules": [{"description": "t1("}]}]),
     r"description 't1\(' is not a valid regex"),
    (_base(channels=[{"name": "a", "rules": [{"modality": "CR"}],
                      "intensity": {"kind": "sharpen"}}]),
     r"intensity.kind: 'sharpen' is not one of zscore, ct_window, xray, us_grey"),
    (_base(channels=[{"name": "a", "rules": [{"modality": "CR"}],
                      "intensity": {"kind": "xray", "windows": []}}]),
     r"windows are only for kind ct_window"),
    (_base(match_order=["a", "b"]), r"match_order must list every channel once"),
    (_base(size=[224]), r"size: expected 2 positive ints"),
    (_base(size=[224.5, 224]), r"size: expected 2 positive ints"),
    (_base(dims="3d", spacing=[1, 1]), r"spacing: expected 3 positive floats"),
    (_base(dims="3d", spacing=[1, 1, float("inf")]), r"spacing: expected 3 positive floats"),
    (_base(size=[4097, 224]), r"size: \[4097, 224\] is over the cap of 4096 per axis"),
    (_base(dims="3d", size=[1024, 1024, 1024]), r"over the cap of 4096 per axis and 134217728"),
])
def test_a_broken_layout_fails_with_one_clear_error(raw, message):
    with pytest.raises(LayoutError, match=message):
        Layout.from_dict(raw)


def test_a_broken_user_file_fails_before_anything_runs(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nchannels: [a, b\n")
    with pytest.raises(LayoutError, match=r"not valid YAML \(line 3, column \d+\): ") as err:
        load_layout(str(path))              # where the parser gave up, one line
    assert "\n" not in str(err.value)


def test_hydra_group_composes_the_shipped_file():
    from server.config.compose import load_experiment
    from server.config.schema import ConfigError

    cfg = load_experiment()
    assert cfg.data.layout["name"] == "brain_mri_4seq"     # the default
    expected = yaml.safe_load((LAYOUT_DIR / "brain_mri_4seq.yaml").read_text())
    assert Layout.from_dict(cfg.data.layout) == Layout.from_dict(expected)
    with pytest.raises(ConfigError, match="data/layout.*no option 'nope'.*chest_xray"):
        load_experiment(["data/layout=nope"])
    # 2D layouts train 2D models.
    chest = load_experiment(["data/layout=chest_xray"])
    assert chest.model_options()["num_sequences"] == 2          # frontal, lateral
    assert chest.job_spec().layout == Layout.from_dict(
        yaml.safe_load((LAYOUT_DIR / "chest_xray.yaml").read_text()))
    assert cfg.job_spec().layout is None and "num_sequences" not in cfg.model_options()
    # a 3D layout makes the model 3D (the model yaml's spatial_dims: 2 is the 2D default)
    ct = load_experiment(["data/layout=ct_volume", "model=mmvit_tiny"])
    assert ct.model_options()["spatial_dims"] == 3 and ct.model_options()["num_sequences"] == 3
    assert chest.model_options()["spatial_dims"] == 2
    with pytest.raises(ConfigError, match="needs spacing"):
        load_experiment(["data/layout=ct_volume", "~data.layout.spacing"])
    with pytest.raises(ConfigError, match="intensity for 2D projection images"):
        load_experiment(["data/layout=ct_volume", "data.layout.channels.0.intensity.kind=xray",
                         "~data.layout.channels.0.intensity.windows"])
    with pytest.raises(ConfigError, match="num_sequences=4 but data/layout=chest_xray has 2"):
        load_experiment(["data/layout=chest_xray", "+model.options.num_sequences=4"])
