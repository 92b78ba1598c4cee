"""What a site accepts from the server: names from closed registries, typed values only."""

import json

import pytest
from flwr.app import ConfigRecord

from client.job import JobError, decode_job
from server.config import load_experiment
from server.federation import job_config
from protocol import wire


def _config(**changes) -> ConfigRecord:
    record = job_config(load_experiment())
    for key, value in changes.items():
        record[key] = value
    return record


def test_server_job_config_decodes_into_a_buildable_job():
    job = decode_job(_config(), site_seed=1)
    model, task = job.build()
    assert model.config.num_classes == len(job.class_names) == task.config.num_classes
    assert job.train.seed != decode_job(_config(), site_seed=2).train.seed   # per-site streams


@pytest.mark.parametrize("key, value, message", [
    (wire.MODEL_NAME, "os.system", "unknown model 'os.system'"),
    (wire.MODEL_OPTIONS, json.dumps({"__class__": "x"}), "unknown option"),
    (wire.TASK_NAME, "detection", "unknown task"),
    (wire.MODEL_OPTIONS, "{not json", "not valid JSON"),
    (wire.LR, "0.1", "should be float"),
])
def test_site_refuses_malformed_or_foreign_requests(key, value, message):
    with pytest.raises(JobError, match=message):
        decode_job(_config(**{key: value}), site_seed=0)


def test_missing_keys_are_named():
    record = _config()
    del record[wire.BATCH_SIZE]
    with pytest.raises(JobError, match="batch-size"):
        decode_job(record, site_seed=0)
