"""A site's failure as one line, from each form of error reason Flower carries."""

from __future__ import annotations

from types import SimpleNamespace

from flwr.app import Error

from protocol.site_errors import one_line
from strategies.guard import error_summary

# What a simulated site's SiteError reaches the coordinator as: Ray's task error around
# Flower's ClientAppException, its remote traceback first (the shape of a real reply).
RAY = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() "
       "(pid=24889, ip=127.0.0.1, actor_id=ab12, repr=<ClientAppActor object at 0x7f>)\n"
       "  File \"/x/ray_actor.py\", line 65, in run\n"
       "    raise ClientAppException(str(ex)) from ex\n"
       "flwr.clientapp.client_app.ClientAppException: \n"
       "Exception ClientAppException occurred. Message: site-policy: the site's budget is "
       "spent'>")


def test_a_simulated_sites_refusal_is_its_own_line_without_flowers_wrapping():
    assert one_line(RAY) == "site-policy: the site's budget is spent"
    assert one_line(f"c (node 17): {RAY}") == "c (node 17): site-policy: the site's budget is spent"


def test_a_deployed_sites_refusal_and_other_forms_read_as_one_line():
    deployed = "<class 'client.mods.errors.SiteError'>:<'site-failure: the site failed'>"
    assert one_line(deployed) == "SiteError: site-failure: the site failed"
    raised = "c (node 17): <class 'client.job.JobRefused'>:<'no privacy budget left\nsee log'>"
    assert one_line(raised) == "c (node 17): JobRefused: no privacy budget left"
    trace = "b (node 3): Traceback (most recent call last):\n  File \"x\", line 1\nOSError: disk"
    assert one_line(trace) == "b (node 3): OSError: disk"
    unavailable = "a (node 1): Error: Node Unavailable"
    assert one_line(f"{unavailable}\n") == unavailable


def test_the_preflight_and_the_guard_name_a_failed_site_by_its_line():
    """The preflight's 'not counted as a site' line ended in Flower's quote (``...'>``)."""
    reply = SimpleNamespace(error=Error(code=0, reason=RAY),
                            metadata=SimpleNamespace(src_node_id=9))     # what it reads
    summary = error_summary(reply)
    assert summary.endswith(": site-policy: the site's budget is spent"), summary
    assert "'>" not in summary and "ClientAppException" not in summary
