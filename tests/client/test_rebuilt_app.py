"""The ClientApp as Flower's Ray simulation ships it to an actor with every message (pickled
on the server's process): as ``make_client_app`` and its arguments, none of its closures by
value (each cost the server ~14 ms of CPU per message: ``client/rebuilt_app.py``)."""

from __future__ import annotations

import shutil

import numpy as np
from flwr.app import Context, RecordDict

from client.app import make_client_app
from client.rebuilt_app import RebuiltClientApp
from protocol import wire
from tests.client.test_runtime import _train_message

SMALL = ["model=mmvit_tiny", "task.image_size=32", "train.local_epochs=1", "train.batch_size=8"]


class AuditMod:
    """A caller's mod (as the benchmarks' meters are): picklable by name."""

    def __init__(self, tag: str):
        self.tag = tag

    def __call__(self, msg, context, call_next):
        return call_next(msg, context)


def test_the_shipped_app_pickles_no_function_by_value_and_is_rebuilt_with_its_mods_and_cache(
        tmp_path, monkeypatch):
    from ray import cloudpickle
    from ray.cloudpickle import cloudpickle as impl

    by_value = []
    real = impl._function_getstate

    def counted(func):
        by_value.append(func.__qualname__)
        return real(func)

    monkeypatch.setattr(impl, "_function_getstate", counted)
    app = make_client_app(sim_data_root=tmp_path, sim_train_sites=2, mods=(AuditMod("a"),))
    shipped = cloudpickle.loads(cloudpickle.dumps(app))
    assert by_value == []           # before: every handler, helper and closure mod (~26)
    assert isinstance(shipped, RebuiltClientApp)
    assert shipped._registered_funcs.keys() == app._registered_funcs.keys()
    assert [type(m).__name__ for m in shipped._mods] == [type(m).__name__ for m in app._mods]
    assert [m.tag for m in shipped._mods if isinstance(m, AuditMod)] == ["a"]
    # the same simulation cache (its temp folder), resolved to the process's own copy
    cache, copied = app._rebuild.keywords["data_cache"], shipped._rebuild.keywords["data_cache"]
    assert copied.token == cache.token and copied.sim_root == cache.sim_root is not None
    cache.close()


def test_a_shipped_copy_trains_exactly_as_the_app_itself(tiny_sites, tmp_path, task_identity):
    """Two copies of one simulated site, one served by the app, one by a shipped copy of an
    app built the same way: the same round's update, bit for bit."""
    from ray import cloudpickle

    request = _train_message(SMALL, 1)      # one message: the same initial weights
    replies = []
    for name, ship in (("here", False), ("shipped", True)):
        root = tmp_path / name
        shutil.copytree(tiny_sites / "site-0", root / "site-0")
        app = make_client_app(sim_data_root=root)
        if ship:
            app = cloudpickle.loads(cloudpickle.dumps(app))
        context = Context(run_id=1, node_id=7, node_config={wire.NODE_PARTITION_ID: 0},
                          state=RecordDict(), run_config={})
        reply = app(request, context)
        assert not reply.has_error(), reply.error
        replies.append(reply.content)
    here, shipped = replies
    assert dict(here[wire.METRICS]).keys() == dict(shipped[wire.METRICS]).keys()
    assert here[wire.METRICS][wire.NUM_EXAMPLES] == shipped[wire.METRICS][wire.NUM_EXAMPLES]
    assert here[wire.ARRAYS].keys() == shipped[wire.ARRAYS].keys()
    for key in here[wire.ARRAYS]:
        np.testing.assert_array_equal(here[wire.ARRAYS][key].numpy(),
                                      shipped[wire.ARRAYS][key].numpy())
