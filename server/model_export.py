"""A phase's global model registered every round without tracing the same graph every round.

``mlflow.pytorch`` saves a ``pt2`` model by tracing it with ``torch.export`` - about a second
of server CPU per round for the demo's ViT, on the cores the sites train on - and then, by
default, loads the saved model again and scores the input example with it ("serving input
validation"). Within a phase the global model's graph is the same every round: the same
architecture, the same wrapper; only its weights change. :class:`ReusedExport` is the flavor
``Model.log`` saves with: the first time, ``mlflow.pytorch.save_model`` itself, its program
loaded back and checked to score the input example and a probe as the model in memory does
(what MLflow's validation would load, with a check that compares the scores; MLflow's own
costs ~1 s of CPU and only logs a failure); after that the same files (its MLmodel
description read once), with the new weights written into the program traced then, and its
``pt2`` archive written again with only the weights' records replaced
(``server/pt2_archive.py``: ``torch.export.save`` would serialise the unchanged graph again,
~0.3 s of CPU per version; it is used only when the archive's layout is not the one that
module knows, counted in ``serialized``). A version is made that way only when

- the model's state (keys, shapes, dtypes), its wrapper class and the input example are the
  traced one's, and
- the program with the new weights scores a probe input exactly as the model in memory does;

otherwise it is traced again (and that becomes the template). What is reused is counted
(``reused``), never silent.

The template need not come from a version: :meth:`ReusedExport.prepare` traces it from the
phase's initial model (the weights do not change the trace) while round 1's sites train, so
the first version, registered during round 2, is already written from it (``prepared``).
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from .pt2_archive import Pt2Template

log = logging.getLogger(__name__)

PT2_FILE = Path("data") / "model.pt2"      # mlflow.pytorch's place for a pt2 program
MLMODEL = "MLmodel"
FLAVOR = "mlflow.pytorch"                  # what the logged model records as its flavor

# torch.export (non-strict, torch 2.13) traces with torch.fx, which replaces
# ``torch.nn.Module.__call__`` and ``__getattr__`` process-wide for the trace's duration: a
# module built or called on another thread meanwhile goes through the tracer's versions (a
# MONAI SwinUNETR built then has no blocks in its state dict; tests/server/test_export_ahead.py).
# The writer traces holding this lock; the round loop builds the global model holding it.
TRACING = threading.Lock()


def _structure(model: torch.nn.Module) -> tuple:
    """What the traced graph depends on besides the weights' values."""
    state = model.state_dict()
    return (type(model).__qualname__, tuple(getattr(model, "input_shape", ())),
            tuple((k, tuple(v.shape), v.dtype) for k, v in state.items()))


def _environment_files() -> tuple[str, ...]:
    """The files mlflow.pytorch.save_model writes after counting the model's size."""
    from mlflow.utils.environment import (_CONDA_ENV_FILE_NAME, _CONSTRAINTS_FILE_NAME,
                                          _PYTHON_ENV_FILE_NAME, _REQUIREMENTS_FILE_NAME)

    return (_CONDA_ENV_FILE_NAME, _CONSTRAINTS_FILE_NAME, _PYTHON_ENV_FILE_NAME,
            _REQUIREMENTS_FILE_NAME)


EXPORT_PREFIX = ".export-"


def sweep_exports(parent: Path) -> int:
    """Remove the template folders a killed server (SIGKILL, OOM) left in ``parent``, its
    run directory: a template is the traced model with its weights (the size of the
    model), so one left in the system's temp folder per killed run would pile up. Only the
    one server of that run directory may call this, before it makes its own. How many."""
    found = [p for p in parent.glob(f"{EXPORT_PREFIX}*")
             if p.is_dir() and not p.is_symlink()]
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return len(found)


class ReusedExport:
    """An MLflow flavor (``Model.log(flavor=...)``) for one phase's global models: traced
    once, then written with each round's weights (module docstring). One writer thread.
    ``parent``: where its template folder is made (a server passes its run directory, see
    :func:`sweep_exports`; default: the system's temp folder)."""

    def __init__(self, parent: Path | None = None):
        self._dir = tempfile.TemporaryDirectory(prefix=EXPORT_PREFIX, dir=parent)
        self._template: Path | None = None
        self._key: tuple | None = None
        self._example: np.ndarray | None = None
        self._program = None                    # torch.export.ExportedProgram, loaded
        self._module = None                     # its graph as a module, on the same tensors
        self.reused = 0                         # versions written from the template
        self.traced = 0                         # versions traced by mlflow.pytorch
        self._archive: Pt2Template | None = None  # the traced archive, records in memory
        self._described = None                  # the traced version's MLmodel description
        self.serialized = 0                     # reused versions torch.export.save wrote
        self.prepared = 0                       # templates traced ahead, from no version
        self.scores_like_model: bool | None = None   # the last version's check (None: none ran)

    def close(self) -> None:
        self._program = self._module = self._archive = None
        self._dir.cleanup()

    @property
    def ready(self) -> bool:
        """Whether a template is there for the next version to reuse."""
        return self._template is not None

    def prepare(self, pytorch_model: torch.nn.Module, input_example: np.ndarray,
                **kwargs) -> bool:
        """Trace the template from ``pytorch_model`` ahead of the phase's first version, with
        what ``Model.log`` will give :meth:`save_model` (``kwargs``: ``pip_requirements``,
        ``serialization_format``); no version is made. Whether a template is kept (not when
        its program scores otherwise: then the first version is traced, as without this)."""
        import mlflow
        from mlflow.models import Model

        path = Path(self._dir.name) / "prepared"
        with TRACING:
            mlflow.pytorch.save_model(pytorch_model, str(path), mlflow_model=Model(),
                                      input_example=input_example, **kwargs)
        self.prepared += 1
        self._remember(path, _structure(pytorch_model), np.asarray(input_example),
                       pytorch_model, ahead=True)
        shutil.rmtree(path, ignore_errors=True)      # _remember kept its own copy
        self.scores_like_model = None                # this is no version's check
        return self.ready

    def save_model(self, path, mlflow_model, pytorch_model, input_example=None, **kwargs):
        """``Model.log``'s call: save ``pytorch_model`` as a pt2 MLflow model in ``path``."""
        import mlflow

        key = _structure(pytorch_model)
        self.scores_like_model = None
        if self._template is not None and key == self._key and input_example is not None \
                and np.array_equal(np.asarray(input_example), self._example) \
                and self._write_reused(Path(path), mlflow_model, pytorch_model):
            self.reused += 1
            self.scores_like_model = True        # checked before it was written
            return
        with TRACING:
            mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model,
                                      input_example=input_example, **kwargs)
        self.traced += 1
        if input_example is not None:       # what the template is checked on
            self._remember(Path(path), key, np.asarray(input_example), pytorch_model)

    def _remember(self, path: Path, key: tuple, example: np.ndarray,
                  model: torch.nn.Module, *, ahead: bool = False) -> None:
        """Keep the version just traced (``ahead``: the program :meth:`prepare` traced, no
        version) as the template, once its saved program (loaded back, as MLflow's
        serving-input validation would) scores the input example and the probe as ``model``
        does; otherwise warn and keep none (the next one is traced)."""
        from mlflow.models import Model

        if self._template is not None:
            shutil.rmtree(self._template, ignore_errors=True)
        self._template = self._program = self._module = self._archive = None
        template = Path(self._dir.name) / f"template-{self.prepared}-{self.traced}"
        shutil.copytree(path, template)
        program = torch.export.load(str(template / PT2_FILE))
        self._module, self._example = program.module(), example.copy()
        self.scores_like_model = self._scores_like(model, torch.as_tensor(example))
        if not self.scores_like_model:
            if ahead:
                log.warning("the program traced ahead from the phase's initial model does "
                            "not score its input example as the model does: no template is "
                            "kept, the phase's first version is traced when registered")
            else:
                log.warning("the saved program of this version does not score its input "
                            "example as the model does (tagged serving_check=failed): the "
                            "next version is traced again")
            self._module = None
            return
        self._template, self._key, self._program = template, key, program
        self._archive = Pt2Template.read(template / PT2_FILE, program)
        self._described = Model.load(str(template / MLMODEL))   # flavors, signature, example

    def _scores_like(self, model: torch.nn.Module, *inputs: torch.Tensor) -> bool:
        """Whether the template's program scores ``inputs`` and a probe as ``model`` does."""
        # a probe with its own generator: the server's torch RNG is never drawn from here
        probe = torch.randn(2, *self._example.shape[1:],
                            generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return all(torch.allclose(self._module(x), model(x), rtol=1e-5, atol=1e-6)
                       for x in (*inputs, probe))

    def _write_reused(self, path: Path, mlflow_model, model: torch.nn.Module) -> bool:
        """The template's files with ``model``'s weights; False (nothing written) if the
        program with them does not score the probe as ``model`` does."""
        from mlflow.utils.file_utils import get_total_file_size

        program, state = self._program, model.state_dict()
        weights = dict(program.state_dict) | {k: v for k, v in program.constants.items()
                                               if k in state}
        if set(weights) != set(state):
            return False
        with torch.no_grad():
            for k, v in weights.items():
                v.copy_(state[k])
        if not self._scores_like(model):
            log.warning("the traced program with this round's weights does not score as "
                        "the model does: tracing it again")
            return False
        shutil.copytree(self._template, path, dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if n in (MLMODEL,
                                                                                 "model.pt2")])
        if self._archive is None or not self._archive.write(path / PT2_FILE, program):
            if self._archive is not None:
                log.info("a weight no longer fills its pt2 record: saving this version's "
                         "program with torch.export.save")
            torch.export.save(program, str(path / PT2_FILE))
            self.serialized += 1
        traced = self._described
        mlflow_model.flavors = copy.deepcopy(traced.flavors)
        mlflow_model.signature = traced.signature
        mlflow_model.saved_input_example_info = copy.deepcopy(traced.saved_input_example_info)
        # as mlflow.pytorch.save_model counts it: before its environment files are written
        mlflow_model.model_size_bytes = (get_total_file_size(str(path)) - sum(
            (path / name).stat().st_size for name in _environment_files()
            if (path / name).is_file())) or None
        mlflow_model.save(str(path / MLMODEL))
        return True
