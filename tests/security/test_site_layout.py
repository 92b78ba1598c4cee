"""A coordinator cannot choose which of a deployed site's series are read.

The job's layout is the coordinator's data: its rules select the series a site reads (a
rule admitting every series description would train on anything the archive holds, secondary
captures of scanned documents included). A deployed site reads only with its own copy of a
layout it declared or ships, and only when the job's layout equals it in every rule - a job
that keeps the name and widens the rules is refused before any file is read, and the
preflight's readiness flag says so."""

from __future__ import annotations

import json
import shutil

import pydicom
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import make_client_app
from client.data.layout import load_layout
from client.job import decode_job
from client.mods.errors import SiteError
from protocol import wire
from protocol.policy import SitePolicy
from server.config import load_experiment
from server.federation import job_config

pytestmark = pytest.mark.usefixtures("task_identity")

SMALL = ["experiment=smoke", "model=mmvit_tiny", "task.image_size=32", "train.local_epochs=1",
         "train.batch_size=8"]


def _widened(name: str) -> dict:
    """The shipped layout ``name`` under its own name, its first rule matching anything."""
    raw = load_layout(name).to_dict()
    raw["channels"][0]["rules"][0]["description"] = ".*"
    return raw


def _train(layout: dict | None) -> Message:
    record = job_config(load_experiment(SMALL))
    if layout is not None:
        record[wire.DATA_LAYOUT] = json.dumps(layout, sort_keys=True)
    record[wire.SERVER_ROUND] = 1
    model, _ = decode_job(record, site_seed=0).build()
    return Message(RecordDict({wire.CONFIG: record,
                               wire.ARRAYS: ArrayRecord(model.state_dict())}),
                   dst_node_id=7, message_type=MessageType.TRAIN)


@pytest.fixture
def deployed(tiny_sites, tmp_path):
    shutil.copytree(tiny_sites / "site-0", tmp_path / "site-0")
    return Context(run_id=1, node_id=7, run_config={}, state=RecordDict(),
                   node_config={wire.NODE_DATA_DIR: str(tmp_path / "site-0"),
                                wire.NODE_LAYOUT: "brain_mri_4seq"})


@pytest.fixture
def reads(monkeypatch):
    """Every DICOM file the site opens, counted."""
    opened: list[str] = []
    real = pydicom.dcmread

    def counting(*args, **kwargs):
        opened.append(str(args[0]) if args else "")
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)    # every reader calls pydicom.dcmread
    return opened


def test_a_renamed_wider_layout_is_refused_before_any_file_is_read(deployed, reads):
    app = make_client_app()
    with pytest.raises(SiteError, match="site-policy: .*differs from this site's own"):
        app(_train(_widened("brain_mri_4seq")), deployed)
    assert reads == []
    # control: the same site trains with the layout exactly as it holds it (explicit or
    # implied by a job that names none), reading its files
    assert not (ok := app(_train(load_layout("brain_mri_4seq").to_dict()), deployed)).has_error(), \
        ok.error
    assert reads


def test_the_preflight_flag_compares_the_whole_layout_not_its_name(tmp_path):
    app = make_client_app()
    brain = dict(job_config(load_experiment(["experiment=smoke"])))
    site = {wire.NODE_DATA_DIR: str(tmp_path / "site"), wire.NODE_SITE_ID: "hospital-a",
            wire.NODE_LAYOUT: "chest_xray"}

    def layout_ok(layout: dict, node: dict) -> bool | None:
        config = ConfigRecord({wire.QUERY: wire.QUERY_POLICY, **brain,
                               wire.DATA_LAYOUT: json.dumps(layout, sort_keys=True)})
        msg = Message(RecordDict({wire.CONFIG: config}), dst_node_id=7,
                      message_type=MessageType.QUERY)
        reply = app(msg, Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                                 run_config={}))
        return SitePolicy.from_record(reply.content[wire.POLICY]).layout_ok

    assert layout_ok(load_layout("chest_xray").to_dict(), site) is True
    assert layout_ok(_widened("chest_xray"), site) is False
    reports = load_layout("chest_xray").to_dict() | {"report": False}
    assert layout_ok(reports, site) is False                # the policies select too
    # preprocessing is the experiment's (ct3 sets its own size, spacing and windows)
    resized = load_layout("chest_xray").to_dict() | {"size": [64, 64]}
    assert layout_ok(resized, site) is True
    # a site that declares none serves its shipped layouts as shipped, not renamed rules
    undeclared = {k: v for k, v in site.items() if k != wire.NODE_LAYOUT}
    assert layout_ok(load_layout("chest_xray").to_dict(), undeclared) is True
    assert layout_ok(_widened("chest_xray"), undeclared) is False
