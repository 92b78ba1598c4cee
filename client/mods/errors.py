"""Generic error replies: what a site's failure tells the coordinator.

Flower turns an exception raised by the ClientApp into the error reply's reason
(``str(type(ex)) + str(ex)``), so a handler's ``str(exception)`` - a file path, a study count, a
shape of the site's data - would leave the site. This mod, outermost, catches every exception,
logs it in full in the site's own log, and re-raises a :class:`SiteError` carrying only a fixed
code and the class of failure. Privacy and secure-aggregation refusals are the site's policy,
not its data, and keep their reasons so the operator of the federation knows what to change.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from protocol.job import SpecError

from ..foundation import FoundationRefused
from ..privacy.policy import PrivacyRefused
from ..privacy.secagg import SecAggRefused
from ..queries import QueryRefused
from ..readiness import LayoutRefused
from ..runtime import SiteConfigError

log = logging.getLogger(__name__)

# Refusals whose reasons are policy (written by us, never holding site data): sent as they are.
POLICY_REFUSALS: tuple[type[Exception], ...] = (PrivacyRefused, SecAggRefused, QueryRefused,
                                                FoundationRefused, LayoutRefused)

# class of failure -> (code, generic message); the first match in order wins.
GENERIC: tuple[tuple[type[Exception], str, str], ...] = (
    (SiteConfigError, "site-config", "the site's configuration cannot serve this request"),
    (SpecError, "job-refused", "the site refused the job specification"),
    (Exception, "site-failure", "the site failed to process the message"),
)


class SiteError(RuntimeError):
    """The only exception a site lets out: ``"<code>: <message>"``, no site details."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"{code}: {message}")


def sanitize(err: Exception) -> SiteError:
    """The error the coordinator may see for ``err``."""
    if isinstance(err, SiteError):
        return err
    if isinstance(err, POLICY_REFUSALS):
        return SiteError("site-policy", str(err))
    code, message = next((c, m) for kind, c, m in GENERIC if isinstance(err, kind))
    return SiteError(code, f"{message}; the details are in the site's log")


def generic_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    try:
        return call_next(msg, context)
    except Exception as err:    # noqa: BLE001 - every failure is reported, sanitized
        sent = sanitize(err)
        log.error("%s message failed (%s sent to the server)", msg.metadata.message_type,
                  sent.code, exc_info=err)
        raise sent from None
