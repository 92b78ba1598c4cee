"""Who this site is and what data it has: resolved from the operator's node config.

In a deployment the SuperNode's node config names the site and its data directory; in
simulation Flower only gives a ``partition-id``, which maps to ``<sim-data-root>/site-<id>``.
Loaded data is kept per process (a deployed site's runner serves every message of every run
in one process, ``medfed.deploy.runner``; a simulated site's messages go to long-lived Ray
actors), bounded in size, and read again only when a file of the site changed
(``data_signature``). Decoded studies are kept on disk too: a deployed site's in its state
folder, the simulated sites' in one temp folder of the simulation
(:meth:`SiteDataCache.for_simulation`), so each site is decoded once whichever process
serves it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from flwr.app import Context

from models.task import DataNeeds
from protocol import wire

from . import sim_folder
from .data.cache import CACHE_FOLDER, SiteCache
from .data.cache_files import image_nbytes
from .data.dataset import StudyDataset
from .data.layout import Layout
from .data.layout_site import dataset_options, read_site
from .data.pseudonyms import PseudonymKeyError, site_key
from .data.signature import data_signature as signature_of
from .data.site import SiteData
from .engine import resolve_device
from .privacy.policy import node_settings
from .privacy.policy import state_dir


class SiteConfigError(ValueError):
    """The site's own configuration (node config) is incomplete or wrong."""


@dataclass(frozen=True)
class SiteIdentity:
    site_id: str
    data_dir: Path
    device: torch.device
    role: str = wire.ROLE_TRAIN       # external: evaluates every global model, never trains
    simulated: bool = False           # a simulation partition: seeds stay fixed (resume)
    # The site's pseudonym secret (client.data.pseudonyms); None in simulation only.
    pseudonym_key: bytes | None = field(default=None, repr=False)
    decode_workers: int = 1           # node config decode-workers: DICOM decode processes
    # Where decoded studies are cached (client.data.cache): <state-dir>/cache on a deployed
    # site; None in simulation (SiteDataCache.get points a simulated site at the simulation's
    # own temp folder, never at anything inside the site's data folder).
    cache_dir: Path | None = None
    # The site's state folder (ledger, keys, query log): written every message, never data.
    state_dir: Path | None = None

    @property
    def seed(self) -> int:
        return int(hashlib.sha256(self.site_id.encode()).hexdigest()[:6], 16)


def resolve_site(context: Context, sim_data_root: Path | None = None,
                 sim_train_sites: int | None = None) -> SiteIdentity:
    """Site identity from node config (deployment) or partition id (simulation: partition
    ids from ``sim_train_sites`` on are the ``external`` folder). The role comes from the
    node config (simulation: ``<site>/node-config.toml``)."""
    node = context.node_config
    simulated = False
    if wire.NODE_DATA_DIR in node:
        data_dir = Path(str(node[wire.NODE_DATA_DIR]))
        site_id = str(node.get(wire.NODE_SITE_ID, data_dir.name))
        if not re.fullmatch(wire.SITE_ID_RE, site_id):
            raise SiteConfigError(f"node config {wire.NODE_SITE_ID!r} must be a plain name "
                                  "(1-64 letters, digits, '.', '_' or '-', starting with a "
                                  "letter or digit); set it (default: the data folder's name)")
        # A deployed site's ClientApp process: its progress lines belong in the site's log
        # (the root logger there is at WARNING since opacus' basicConfig on import).
        logging.getLogger("medfed.site").setLevel(logging.INFO)
    elif wire.NODE_PARTITION_ID in node:
        root = sim_data_root or context.run_config.get(wire.RUN_SIM_DATA_ROOT)
        if not root:
            raise SiteConfigError("simulation site has no data root: set run config "
                                  f"{wire.RUN_SIM_DATA_ROOT!r} or node config {wire.NODE_DATA_DIR!r}")
        partition = int(node[wire.NODE_PARTITION_ID])
        external = sim_train_sites is not None and partition >= sim_train_sites
        site_id = wire.ROLE_EXTERNAL if external else f"site-{partition}"
        data_dir = Path(str(root)) / site_id
        simulated = True
    else:
        raise SiteConfigError(f"node config must set {wire.NODE_DATA_DIR!r} (and {wire.NODE_SITE_ID!r})")
    if wire.NODE_TORCH_THREADS in node:
        torch.set_num_threads(int(node[wire.NODE_TORCH_THREADS]))
    settings = node_settings(node, data_dir, simulated=simulated)
    role = str(settings.get(wire.NODE_ROLE, wire.ROLE_TRAIN))
    if role not in wire.ROLES:
        raise SiteConfigError(f"node config {wire.NODE_ROLE!r} must be one of "
                              f"{', '.join(wire.ROLES)}, got {role!r}")
    key = None
    if not simulated:       # a deployed site keys its pseudonyms with its own secret
        try:
            key = site_key(state_dir(settings, data_dir))
        except PseudonymKeyError as e:
            raise SiteConfigError(str(e)) from None
    workers = node.get(wire.NODE_DECODE_WORKERS, 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise SiteConfigError(f"node config {wire.NODE_DECODE_WORKERS!r} must be an integer "
                              f"in [1, 64], got {workers!r}")
    cache_dir = None if simulated else state_dir(settings, data_dir) / CACHE_FOLDER
    return SiteIdentity(site_id, data_dir,
                        resolve_device(str(node.get(wire.NODE_DEVICE, "auto"))), role, simulated,
                        key, workers, cache_dir, state_dir(settings, data_dir))


def data_signature(site: SiteIdentity) -> str:
    """A digest of what the site's readers can read (:mod:`client.data.signature`): every
    file's path, size, times and inode under the data directory, except the state folder
    and hidden top-level folders; a change to any file changes it."""
    return signature_of(site.data_dir, site.state_dir)


class SiteDataCache:
    """Per-process cache of loaded sites and their split datasets (LRU, bounded).

    Keyed by the site (data directory, role and pseudonym key), the class names, the image
    size and the task's ``DataNeeds`` - everything the datasets are a function of - so two
    tasks on one site (say a classifier and a segmenter, or two CLIP runs with different
    tokenizers) are never served each other's data. An entry is used only while the site's
    files are as they were when it was read (``data_signature``, checked on every ``get``): a
    changed, added or removed file makes the next message read the site again.

    ``sim_root`` (:meth:`for_simulation` only): the simulation's own temp folder, the on-disk
    :class:`SiteCache` of every simulated site (``<sim_root>/<site id>``), so the second
    process that serves a site maps its decoded studies instead of decoding its DICOM again.
    """

    def __init__(self, max_sites: int | None = 16, max_bytes: int | None = None,
                 sim_root: Path | None = None):
        self.max_sites = max_sites          # None: as many as ``max_bytes`` allows
        self.max_bytes = max_bytes          # None: no bound on the entries' image bytes
        self.sim_root = sim_root
        self.token = uuid.uuid4().hex       # names this cache in the processes it is sent to
        self._remove = None                 # the owner's finalizer of ``sim_root``
        self._sites: OrderedDict[tuple, tuple[str, tuple[SiteData, dict[str, StudyDataset]]]] \
            = OrderedDict()
        self._bytes: dict[tuple, int] = {}

    def __reduce__(self):
        # Flower's simulation sends the ClientApp, closures and all, to a Ray actor with every
        # message (pickled per call). Unpickled there, the cache is that process's cache of
        # this app, kept across the messages the actor serves - not a fresh, empty copy per
        # message (which read every DICOM file of the site for each message), and never the
        # data itself on the way.
        return (process_cache, (self.token, self.max_sites, self.max_bytes, self.sim_root))

    @classmethod
    def for_simulation(cls, max_bytes: int | None = None) -> SiteDataCache:
        """The cache of a simulation's ClientApp (``medfed simulate``): every site it meets
        within ``max_bytes``, and one private temp folder (0700, under ``TMPDIR``, named
        ``medfed-sim-sites-*``) that the processes serving the simulated sites share as
        their decoded-study cache - written without fsync (throw-away), never inside a
        site's data folder, and removed by :meth:`close`, when this object is collected or
        when this process exits. Known limits: it holds the decoded studies and prepared
        rows (about 2-3x the DICOM's size) in ``TMPDIR`` while the simulation runs; a
        simulation killed by SIGKILL leaves it until the next one starts on this host
        (:mod:`client.sim_folder`)."""
        try:
            root = sim_folder.make()    # 0700; first removes those of killed simulations
        except OSError as err:          # TMPDIR not writable: each process decodes, as before
            logging.getLogger(__name__).warning(
                "no temp folder for the simulated sites' shared decode (%s): each process "
                "decodes its sites itself", type(err).__name__)
            return cls(max_sites=None, max_bytes=max_bytes)
        cache = cls(max_sites=None, max_bytes=max_bytes, sim_root=root)
        cache._remove = weakref.finalize(cache, shutil.rmtree, root, ignore_errors=True)
        return cache

    def close(self) -> None:
        """Remove the simulation's temp folder (its owner only; a no-op elsewhere)."""
        if self._remove is not None:
            self._remove()
        self.sim_root = None        # never used again: a later get would make it anew

    def _evict(self) -> None:
        """Oldest entries out until within both bounds (the newest always stays)."""
        while len(self._sites) > 1 and (
                (self.max_sites is not None and len(self._sites) > self.max_sites)
                or (self.max_bytes is not None and sum(self._bytes.values()) > self.max_bytes)):
            key, _ = self._sites.popitem(last=False)
            self._bytes.pop(key, None)

    def get(self, site: SiteIdentity, class_names: tuple[str, ...], image_size: int,
            needs: DataNeeds = DataNeeds(), layout: Layout | None = None,
            ) -> tuple[SiteData, dict[str, StudyDataset]]:
        """Splits of one site for a task with these ``needs``.

        Training uses the labelled studies (a ``label_fraction`` of them, chosen by a hash of
        the study) or, for self-supervised objectives, every training study
        (``needs.unlabelled``); with ``needs.masks`` only studies with a lesion mask.
        Evaluation splits are always the labelled ones. An external site has one split,
        ``external``: every labelled study. ``layout``: the job's modality layout (None:
        today's brain_mri_4seq reader); its input channels are the model's, in order.
        """
        if site.simulated and site.cache_dir is None and self.sim_root is not None \
                and not _private_folder(self.sim_root):      # said, not silent
            site_logger(site.site_id).warning(
                "the simulation's shared decode folder is gone or not private (0700, ours): "
                "reading this site in this process only")
        if site.simulated and site.cache_dir is None and _private_folder(self.sim_root):
            # this process's copy of the simulation's folder (set here, site-side; never
            # from a message): one decode per site for all the processes that serve it
            site = replace(site, cache_dir=self.sim_root / site.site_id)
        pseudonyms = hashlib.sha256(site.pseudonym_key).hexdigest() if site.pseudonym_key \
            else None
        key = (str(site.data_dir), site.role, pseudonyms, tuple(class_names), image_size,
               needs, layout)
        signature = data_signature(site)
        cached = self._sites.get(key)
        if cached is None or cached[0] != signature:
            if cached is not None:
                site_logger(site.site_id).info("data changed since it was read: reading it "
                                               "again")
            # signature taken before the read: a file changed during it is read again next time
            self._sites[key] = (signature, self._load(site, tuple(class_names), image_size,
                                                      needs, layout))
            self._bytes[key] = _image_bytes(*self._sites[key][1])
        self._sites.move_to_end(key)
        self._evict()
        return self._sites[key][1]

    @staticmethod
    def _load(site: SiteIdentity, class_names: tuple[str, ...], image_size: int,
              needs: DataNeeds, layout: Layout | None = None,
              ) -> tuple[SiteData, dict[str, StudyDataset]]:
        """Read the site and build its splits (uncached)."""
        # a simulation's cache is a throw-away temp folder: no sync (a deployed site's is)
        # (nor is its folder made again when the simulation removed it: served from memory)
        cache = SiteCache(site.cache_dir, durable=not site.simulated,
                          make_parents=not site.simulated) if site.cache_dir is not None else None
        data = read_site(site.data_dir, layout, class_names, multi_label=needs.multi_label,
                         key=site.pseudonym_key, workers=site.decode_workers, cache=cache)
        r = data.report
        site_logger(site.site_id).info(
            "data: %d files, %d images, %d studies (train/val/test %s), skipped %s; cache %s",
            r.files, r.images, r.studies, dict(r.splits), dict(r.skipped) or "none",
            "off" if cache is None else cache.describe())
        text_transform = needs.reports.transform() if needs.reports is not None else None
        extra = {"masks": needs.masks, "text_transform": text_transform} | dataset_options(layout)
        if cache is not None and cache.current is not None:
            extra["store"] = cache.current        # prepared images on disk, read per item
            extra["shared_store"] = site.simulated    # ... or, simulated, read once
        if site.role == wire.ROLE_EXTERNAL:
            labelled = [s for s in data.studies if s.label >= 0]
            return data, {wire.EXTERNAL_SPLIT: StudyDataset(labelled, image_size, **extra)}
        train = data.split("train", labelled_only=not needs.unlabelled)
        if needs.masks:
            train = [s for s in train if s.mask is not None]
        if needs.label_fraction < 1.0:
            train = label_subset(train, needs.label_fraction, keep_unlabelled=needs.unlabelled)
        splits = {"train": StudyDataset(train, image_size, augment=True, **extra)}
        splits |= {name: StudyDataset(data.split(name, labelled_only=True), image_size, **extra)
                   for name in ("val", "test")}
        return data, splits


def _private_folder(path: Path | None) -> bool:
    """``path`` is a folder of this user's that only this user may enter (not a link): the
    simulation's temp folder as ``mkdtemp`` made it. Gone (removed at the simulation's end)
    or replaced: no disk cache, never one re-created in a world-readable place."""
    if path is None:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and \
        stat.S_IMODE(st.st_mode) & 0o077 == 0


def _image_bytes(data: SiteData, splits: dict[str, StudyDataset]) -> int:
    """The bytes of a cache entry's pixels: the decoded studies and the prepared images held
    in memory (a deployed site's prepared images on disk, ``client.data.rows``, not)."""
    decoded = sum(image_nbytes(s.images) for s in data.studies)    # maps nothing
    decoded += sum(s.mask.nbytes for s in data.studies if s.mask is not None)
    prepared = sum(image.numel() * image.element_size() for split in splits.values()
                   for image, _, _ in split.items if image is not None)
    return decoded + prepared


def simulation_cache_bytes(processes: int | None = None) -> int:
    """A simulated site process's data budget: a quarter of the machine's memory shared by one
    process per core (Flower's simulation starts up to one actor per CPU)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return total // (4 * max(processes or os.cpu_count() or 1, 1))


# The caches of the ClientApps whose messages this process served (by token), newest last.
# At most MAX_PROCESS_CACHES apps: a process serves one app per simulation; the bound only
# keeps a process that runs many simulations (a test session) from keeping all their data.
_PROCESS_CACHES: OrderedDict[str, SiteDataCache] = OrderedDict()
MAX_PROCESS_CACHES = 2


def process_cache(token: str, max_sites: int | None, max_bytes: int | None = None,
                  sim_root: Path | None = None) -> SiteDataCache:
    """This process's :class:`SiteDataCache` named ``token`` (what a pickled cache becomes;
    it shares the owner's ``sim_root`` and never removes it)."""
    cache = _PROCESS_CACHES.get(token)
    if cache is None:
        cache = SiteDataCache(max_sites, max_bytes, sim_root)
        cache.token = token
        _PROCESS_CACHES[token] = cache
        while len(_PROCESS_CACHES) > MAX_PROCESS_CACHES:
            _PROCESS_CACHES.popitem(last=False)
    _PROCESS_CACHES.move_to_end(token)
    return cache


def label_subset(studies: list, fraction: float, *, keep_unlabelled: bool = False) -> list:
    """Keep the labels of a deterministic ``fraction`` of the labelled studies (by a hash of
    the pseudonymous study key), at least one. The other labelled studies are dropped, or
    with ``keep_unlabelled`` (self-supervised objectives) kept with their label hidden."""
    def u(study) -> float:
        return int(hashlib.sha256(f"labels:{study.key}".encode()).hexdigest()[:12], 16) / 16**12
    labelled = sorted((s for s in studies if s.label >= 0), key=u)
    keep = {id(s) for s in labelled[:max(1, int(round(fraction * len(labelled))))]}
    if keep_unlabelled:
        return [s if s.label < 0 or id(s) in keep else replace(s, label=-1) for s in studies]
    return [s for s in studies if s.label < 0 or id(s) in keep]


class _SiteAdapter(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['site']}] {msg}", kwargs


def site_logger(site_id: str) -> logging.LoggerAdapter:
    """Logger whose lines carry the site id (and never patient data)."""
    return _SiteAdapter(logging.getLogger("medfed.site"), {"site": site_id})
