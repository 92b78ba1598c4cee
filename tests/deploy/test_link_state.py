"""The coordinator's link state (``medfed server --link-state``): Flower's sqlite file by
default, Flower's in-memory state on request, the same TLS and SuperNode authentication."""

from __future__ import annotations

import pytest

from medfed.cli import build_parser
from medfed.deploy.coordinator import FLOWER_IN_MEMORY, CoordinatorSettings, superlink_command
from medfed.deploy.preflight import DeployError


def _flower_args(settings: CoordinatorSettings) -> list[str]:
    cmd = superlink_command(settings)
    return cmd[cmd.index("--") + 1:]


def test_sqlite_by_default_memory_on_request_with_the_same_protections(tmp_path):
    durable = _flower_args(CoordinatorSettings(certs=tmp_path, state_dir=tmp_path / "s"))
    fast = _flower_args(CoordinatorSettings(certs=tmp_path, state_dir=tmp_path / "s",
                                            link_state="memory"))
    assert durable[durable.index("--database") + 1] == str(tmp_path / "s" / "superlink.db")
    assert fast[fast.index("--database") + 1] == FLOWER_IN_MEMORY
    # nothing else changes: TLS, node authentication, no runtime installs, isolation
    strip = lambda args: args[:args.index("--database")] + args[args.index("--database") + 2:]  # noqa: E731
    assert strip(durable) == strip(fast)
    assert {"--enable-supernode-auth", "--ssl-certfile",
            "--disable-runtime-dependency-installation"} <= set(fast)


def test_the_in_memory_name_is_flowers_own():
    """Flower treats any other ``--database`` value as a sqlite path: a renamed constant would
    silently make a file called ':flwr-in-memory:' instead of the in-memory state."""
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    assert FLOWER_IN_MEMORY == FLWR_IN_MEMORY_DB_NAME


def test_an_unknown_link_state_is_refused(tmp_path):
    with pytest.raises(DeployError, match="--link-state"):
        CoordinatorSettings(certs=tmp_path, state_dir=tmp_path, link_state="postgres")


def test_the_cli_passes_the_link_state():
    base = ["server", "--certs", "c", "--state-dir", "s"]
    assert build_parser().parse_args(base).link_state == "sqlite"
    assert build_parser().parse_args([*base, "--link-state", "memory"]).link_state == "memory"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--link-state", "disk"])
