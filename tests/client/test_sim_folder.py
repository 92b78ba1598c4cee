"""A simulation killed by SIGKILL leaves its sites' decode folder (decoded studies) in TMPDIR;
the next simulation on the host removes it - and nothing that is not such a folder of a dead
process of this user and host."""

from __future__ import annotations

import multiprocessing
import os

from client import sim_folder


def _dead_pid() -> int:
    proc = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    proc.start()
    proc.join()
    return proc.pid


def test_a_killed_simulations_folder_goes_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(sim_folder.tempfile, "tempdir", None)     # read TMPDIR again
    host, dead = sim_folder._host(), _dead_pid()
    killed = tmp_path / f"{sim_folder.PREFIX}{host}-{dead}-abc"
    (killed / "site-0" / "units").mkdir(parents=True)
    (killed / "site-0" / "units" / "u").write_bytes(b"pixels")
    kept = [tmp_path / f"{sim_folder.PREFIX}{host}-{os.getpid()}-abc",     # a live owner
            tmp_path / f"{sim_folder.PREFIX}00000000-{dead}-abc",         # another host
            tmp_path / f"{sim_folder.PREFIX}oldform",                     # not this form
            tmp_path / "other"]
    for folder in kept:
        folder.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_bytes(b"x")
    link = tmp_path / f"{sim_folder.PREFIX}{host}-{dead}-link"
    link.symlink_to(target)                                             # a link: not followed

    made = sim_folder.make()
    assert not killed.exists()
    assert all(folder.is_dir() for folder in kept) and (target / "keep").is_file()
    assert link.is_symlink()
    assert made.parent == tmp_path and made.name.startswith(f"{sim_folder.PREFIX}{host}-"
                                                            f"{os.getpid()}-")
    assert oct(made.stat().st_mode & 0o777) == "0o700"
    assert sim_folder.sweep() == 0 and made.is_dir()                   # its own, alive: kept
