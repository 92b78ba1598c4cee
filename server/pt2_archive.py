"""A ``pt2`` archive written again with new weights, without serialising its graph again.

``torch.export.save`` turns the whole ``ExportedProgram`` into JSON every time (a deep copy
and canonicalisation of the graph: most of a version's CPU once the graph is traced). Within a
phase only the weights change, and a pt2 archive keeps each weight as its own record of raw
bytes (``data/weights/weight_N``, described by ``data/weights/model_weights_config.json``).
:class:`Pt2Template` holds the records of an archive ``torch.export.save`` wrote and writes
them again, through torch's own archive writer, with each weight record replaced by the raw
bytes of the program's tensor now.

This leans on the archive's layout, a torch internal. It is used only when the template
shows exactly that layout: every weight and constant a raw (not pickled), contiguous record of
its own whose bytes are, at reading time, those of the loaded program's tensor; otherwise
:meth:`Pt2Template.read` gives None and the caller saves with ``torch.export.save``.
``tests/server/test_pt2_archive.py`` pins the result to ``torch.export.save``'s record by
record, so a torch upgrade that changes the layout fails there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.export.pt2_archive import constants as pt2
from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

log = logging.getLogger(__name__)

MODEL_NAME = "model"            # torch.export.save's name for a single program
# written by torch's zip writer itself on closing (zip format version, byte order, an id)
_WRITER_RECORDS = {".data/version", ".data/serialization_id", "byteorder"}


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """A dense tensor's values as a pt2 archive stores them: its storage's bytes."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


class Pt2Template:
    """An archive's records, and which of them hold which of the program's tensors."""

    def __init__(self, records: dict[str, bytes], payloads: dict[str, tuple[str, str]]):
        self.records = records          # record name -> bytes, in the archive's order
        self.payloads = payloads        # record name -> ("state_dict" | "constants", fqn)

    @classmethod
    def read(cls, path: Path, program) -> Pt2Template | None:
        """The template in the archive at ``path``, which ``program`` was loaded from; None
        when its layout is not the one this module can write again (why is logged)."""
        with PT2ArchiveReader(str(path)) as reader:
            records = {name: reader.read_bytes(name)
                       for name in reader.archive_file.get_all_records()
                       if name not in _WRITER_RECORDS}
        try:
            return cls._layout(records, program)
        except (KeyError, TypeError, ValueError, AttributeError) as err:   # another format
            return cls._unsupported(f"unexpected weights config: {type(err).__name__}: {err}")

    @classmethod
    def _layout(cls, records: dict[str, bytes], program) -> Pt2Template | None:
        payloads: dict[str, tuple[str, str]] = {}
        for source, config_name, folder in (
                ("state_dict", pt2.WEIGHTS_CONFIG_FILENAME_FORMAT, pt2.WEIGHTS_DIR),
                ("constants", pt2.CONSTANTS_CONFIG_FILENAME_FORMAT, pt2.CONSTANTS_DIR)):
            config = records.get(config_name.format(MODEL_NAME))
            if config is None:
                return cls._unsupported(f"no {config_name.format(MODEL_NAME)}")
            tensors = getattr(program, source)
            for fqn, meta in json.loads(config)["config"].items():
                name = folder + meta["path_name"]
                tensor = tensors.get(fqn)
                if meta.get("use_pickle") or name in payloads or name not in records:
                    return cls._unsupported(f"{fqn}: pickled, shared or missing record")
                if not isinstance(tensor, torch.Tensor) or not tensor.is_contiguous() \
                        or records[name] != raw_bytes(tensor):
                    return cls._unsupported(f"{fqn}: its record is not the tensor's bytes")
                payloads[name] = (source, fqn)
        return cls(records, payloads)

    @staticmethod
    def _unsupported(reason: str) -> None:
        log.warning("pt2 archive layout not reusable (%s): each version is saved with "
                    "torch.export.save", reason)
        return None

    def write(self, path: Path, program) -> bool:
        """The archive again at ``path``, each tensor's record from ``program`` now; False
        (nothing written) if a tensor no longer fills its record exactly."""
        records = dict(self.records)
        for name, (source, fqn) in self.payloads.items():
            data = raw_bytes(getattr(program, source)[fqn])
            if len(data) != len(records[name]):
                return False
            records[name] = data
        with PT2ArchiveWriter(str(path)) as writer:
            for name, data in records.items():
                writer.write_bytes(name, data)
        return True
