"""``data_signature`` (checked on every message) walks with ``os.scandir`` and skips the
state folder by inode; its digest is the one the former os.walk + os.stat + realpath walk
gave, on a tree with everything the readers and MedFed put there."""

from __future__ import annotations

import hashlib
import os

import pytest

from client.data.signature import data_signature


def _former(data_dir, state_dir) -> str:
    """The former implementation (client.runtime until session 23), verbatim."""
    root = str(data_dir)
    skip = os.path.realpath(state_dir) if state_dir is not None else None
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not (folder == root and d.startswith("."))
                         and os.path.realpath(os.path.join(folder, d)) != skip)
        prefix = os.path.relpath(folder, root)
        for name in sorted(files):
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            rel = name if prefix == "." else os.path.join(prefix, name)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0"
                     f"{st.st_ino}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


@pytest.fixture
def tree(tmp_path):
    site = tmp_path / "site"
    for rel in ("dicom/p1/s1/1.dcm", "dicom/p1/s1/2.dcm", "dicom/p2/a.dcm", "labels.csv",
                "dicom/.hidden-nested/x.dcm", ".medfed/ledger.json", ".hidden/y",
                "state/keys.json", "dicom/p1/state/z.dcm", "b/ü-name.dcm"):
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rel.encode() * 3)
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "o.dcm").write_bytes(b"o")
    (outside / "file.dcm").write_bytes(b"linked file")
    os.symlink(outside / "file.dcm", site / "dicom" / "link.dcm")           # file link
    os.symlink(outside, site / "dicom" / "linked-folder")                   # folder link
    os.symlink(tmp_path / "nowhere", site / "dicom" / "dangling.dcm")       # dangling
    os.symlink(site / "state", site / "dicom" / "state-link")               # link to state
    return site


@pytest.mark.parametrize("state", [None, ".medfed", "state", "dicom/p1/state", "absolute",
                                   "missing"])
def test_the_scandir_walk_gives_the_former_digest(tree, state):
    state_dir = {None: None, "absolute": (tree / "state").resolve(),
                 "missing": tree / "no-such-folder"}.get(state, tree / str(state))
    assert data_signature(tree, state_dir) == _former(tree, state_dir)


def test_the_state_folder_is_skipped_and_a_data_change_is_seen(tree):
    before = data_signature(tree, tree / "state")
    (tree / "state" / "ledger-2.json").write_text("{}")
    assert data_signature(tree, tree / "state") == before
    assert data_signature(tree, None) != before
    (tree / "dicom" / "p2" / "new.dcm").write_bytes(b"x")
    assert data_signature(tree, tree / "state") != before


def test_the_runtime_name_still_works(tree):
    from client.runtime import data_signature as runtime_signature
    from client.runtime import SiteIdentity

    import torch
    site = SiteIdentity("site-0", tree, torch.device("cpu"), state_dir=tree / "state")
    assert runtime_signature(site) == _former(tree, tree / "state")
