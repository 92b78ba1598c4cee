"""Is the MLflow tracking store there? Asked in seconds, before a run starts.

MLflow's client retries a refused connection with backoff for minutes and then fails with
pages of tracebacks. ``tracking.uri=http(s)://...`` is checked here first with one short
request to the server's ``/health`` endpoint; a ``sqlite:`` or file store needs a folder this
process can write. Standard library only: ``medfed run`` asks it before submitting, without
importing MLflow.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

TIMEOUT = 5.0
START_SERVER = ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --backend-store-uri "
                "sqlite:///mlflow.db --host {host} --port {port}")


def check_tracking_store(uri: str | None, *, timeout: float = TIMEOUT) -> str | None:
    """None when the store answers (or is the run folder's own sqlite, ``uri`` None); else one
    line naming the URI (without credentials) and the fix."""
    if not uri:
        return None
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return _check_server(uri, parts, timeout)
    if parts.scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        return _check_folder(Path(path).parent if path else None, uri)
    if parts.scheme in ("", "file"):
        return _check_folder(Path(parts.path or uri), uri)
    return None                   # databricks, postgresql, ...: MLflow's own errors


def _check_server(uri: str, parts, timeout: float) -> str | None:
    shown = _without_credentials(parts)
    health = shown.rstrip("/") + "/health"
    request = urllib.request.Request(health, method="GET")
    try:       # proxies as the environment says (MLflow's client honours the same variables)
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            if answer.status == 200:
                return None
            reason = f"HTTP {answer.status} from {health}"
    except urllib.error.HTTPError as err:
        reason = f"HTTP {err.code} from {health}"
    except (TimeoutError, socket.timeout):
        reason = f"no answer within {timeout:g} s"
    except urllib.error.URLError as err:
        cause = err.reason
        reason = (f"no answer within {timeout:g} s" if isinstance(cause, socket.timeout)
                  else getattr(cause, "strerror", None) or str(cause))
    except OSError as err:
        reason = err.strerror or type(err).__name__
    command = START_SERVER.format(host=parts.hostname or "127.0.0.1", port=parts.port or 5000)
    return (f"the MLflow tracking server at {shown} is not reachable ({reason}); start it "
            f"with `{command}` or run with tracking=local (results in the run folder)")


def _check_folder(folder: Path | None, uri: str) -> str | None:
    if folder is None:
        return f"tracking.uri={uri} names no file; use sqlite:///<path>/mlflow.db"
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return (f"tracking.uri={uri}: {existing or folder} is not a folder this process can "
                "write; choose a writable path or run with tracking=local")
    return None


def _without_credentials(parts) -> str:
    """The URI as it may appear in a log line: no user or password."""
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def without_credentials(uri: str) -> str:
    """``uri`` as it may appear in a log line: no user, password or (for a server) query."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return _without_credentials(parts)
    if "@" in parts.netloc:                        # postgresql://user:password@host/db
        return uri.replace(parts.netloc, parts.netloc.rsplit("@", 1)[1], 1)
    return uri
