"""A ClientApp that pickles as the call that built it, not as its closures.

Flower's Ray simulation sends the ClientApp to an actor with every message, pickled per call
(``RayBackend.process_message``, on the server's process). Pickled as it is, every handler,
helper and mod of ``client/app.py`` - closures, so not importable by name - goes by value,
and for each of them cloudpickle scans every loaded module for the submodules its globals
might address (``_find_imported_submodules``): ~14 ms of the server's CPU per message once
torch and MLflow are loaded (measured side by side with a plain Flower app's ~12 ms), on the
cores the simulated sites train on, and growing with the sites (two messages per site and
round). Pickled as ``make_client_app`` and its arguments (importable by name), the actor
builds the same app again from them: the same fresh objects per message as before (the mods
unpickled, the data cache resolved to that process's own, ``SiteDataCache.__reduce__``), a
few hundred bytes on the way. A deployed site loads its app by name and never pickles it.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.clientapp import ClientApp


class RebuiltClientApp(ClientApp):
    """A :class:`ClientApp` whose pickle is ``rebuild``, a call (importable function and
    picklable arguments, e.g. a ``functools.partial``) that makes an equal app."""

    def __init__(self, *, mods: list, rebuild: Callable[[], ClientApp]):
        super().__init__(mods=mods)
        self._rebuild = rebuild

    def __reduce__(self):
        return (self._rebuild, ())
