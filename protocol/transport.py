"""Transfer tuning shared by a deployed coordinator and its sites: how soon a message object
that is not there yet is asked for again.

Flower 1.41 retries a missing object after 1 s, doubling up to 10 s (``PULL_INITIAL_BACKOFF``,
``PULL_BACKOFF_CAP`` in ``flwr.supercore.inflatable``). On a deployed federation an object is
usually missing only for the moment between a message being announced and its bytes being
stored (the SuperNode offers a task before it has downloaded the arrays; a reply is listed
before its objects are in), so the first retry should come soon. The ServerApp's reply pulls
(``server.prompt_grid``) and the SuperNode's download (``medfed.deploy.supernode``) use this
one setting; the site runner's pull from its own SuperNode, on loopback, retries sooner still
(``medfed.deploy.runner.LOCAL_PULL_BACKOFF``).
"""

from __future__ import annotations

# keyword arguments of Flower's ``pull_objects`` / ``pull_and_inflate_object_from_tree``
OBJECT_PULL_BACKOFF = {"initial_backoff": 0.05, "backoff_cap": 0.5}
