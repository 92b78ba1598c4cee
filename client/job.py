"""Decode what the server asked for, validating at the boundary.

The job spec and its wire codec are the protocol's (``protocol.job``), shared with the server;
what stays here is the site's part: models and tasks are looked up by name in its closed
registries, an unknown name or option is refused with the list of valid ones (a site never
imports a path that came over the wire), and the job gets this site's own random stream.
"""

from __future__ import annotations

from flwr.app import ConfigRecord

from models import MODELS, TASKS
from protocol.job import JobError, JobSpec, SpecError

# What a site trains: the protocol's spec, with ``train.seed`` derived for this site and round.
Job = JobSpec


def decode_job(config: ConfigRecord, *, site_seed: int) -> Job:
    """``ConfigRecord`` -> ``Job``; every missing or ill-typed key is named in the error.

    Raises
    ------
    JobError
        On a malformed request, a name or option this site's registries do not offer, or a
        privacy request the task cannot honour (DP-SGD for a batch-coupled task).
    """
    job = JobSpec.from_record(config).for_site(site_seed)
    try:
        MODELS.config(job.model_name, job.model_options)     # validate names and options now
        TASKS.config(job.task_name, job.task_options)
        job.privacy.check_task(job.task_name, job.task_options)
    except SpecError as err:
        raise JobError(str(err)) from None
    except (KeyError, TypeError, ValueError) as err:
        raise JobError(str(err).strip('"')) from None
    return job
