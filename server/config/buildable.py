"""The phase's model as every site will build it, checked at config load: built by the
sites' own code (``JobSpec.build``: the registry backbone wrapped by the task) on the meta
device, and made servable as the exporter makes it (``models.serving.servable``).

A model/task pair that does not fit (``task.options.mode=lora`` on a backbone without a
MultiModalViT's projections, a segmentation task on a foundation encoder, an objective that
needs a token layout the backbone lacks) used to pass config load and fail at every site, in
the preflight or round 1, with the cause only in the sites' logs; a model the exporter cannot
serve failed after round 1. Both are now one line here, before anything starts. So is a
pretrain -> fine-tune run whose fine-tuning backbone cannot load phase 1's: the coordinator
found it only after all of pretraining.

The meta device holds shapes only: no memory is allocated and no weights are read. A
foundation model's loaders build from its directory's config files alone on the meta
device (``models.foundation.loading``), and that directory is the one ``validate_foundation``
already requires the coordinator to hold (config.json and its weight files present, not
read): nothing more is required of the coordinator than before. Each site builds from its
own directory of the same name, with the digest check as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .schema import ConfigError, ExperimentConfig

if TYPE_CHECKING:
    from torch import nn


def built_model(cfg: ExperimentConfig, pretrained: nn.Module | None = None
                ) -> tuple[nn.Module, object]:
    """``(model, task)`` of ``cfg``'s phase as the sites build it, on the meta device.

    ``pretrained``: phase 1's model (as this function built it) in a pretrain -> fine-tune
    run. Phase 2 then starts from its backbone as the coordinator hands it over after phase
    1 (``models.tasks.backbone_weights``, then ``load_backbone`` inside ``build``): the same
    functions on the shapes alone, so exactly what that hand-over refuses is refused here.

    Raises
    ------
    ConfigError
        The sites' build raises: one line naming the model, the task and what to change; or
        the pretrained backbone does not fit: one line naming both phases and the first
        weight that does not fit.
    """
    import torch

    from models.tasks import BackboneMisfit, build  # build: what JobSpec.build calls, with
                                        # the job's own names and options (a spec would need
                                        # a private run's id)
    state = None if pretrained is None else _handed_over(cfg, pretrained)
    try:
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            return build(cfg.model.name, cfg.model_options(), cfg.task.name,
                         cfg.task_options(), backbone_state=state,
                         foundation_dir=cfg.model.foundation_dir)
    except ConfigError:
        raise
    except BackboneMisfit as err:
        got = "absent" if err.state_shape is None else str(list(err.state_shape))
        raise ConfigError(f"{_phases(cfg)}: fine-tuning cannot load the pretrained backbone "
                          f"(after all of pretraining, the coordinator would refuse it): "
                          f"{err.key} is {got} after pretraining and {list(err.shape)} in "
                          f"fine-tuning ({err.count} weight{'s' if err.count > 1 else ''} "
                          "unfit); both phases must build the same backbone") from None
    except Exception as err:  # noqa: BLE001 - whatever a site's build raises, it raises there
        raise ConfigError(f"model={_model(cfg)} with task={cfg.task.name}{_mode(cfg)}: every "
                          f"site's build would fail ({_first_line(err)}); change the model, "
                          "the task or the option named") from None


def _handed_over(cfg: ExperimentConfig, pretrained: nn.Module) -> dict:
    """What phase 2 receives of phase 1's final model (meta tensors: shapes only)."""
    from models.tasks import backbone_weights

    try:
        return backbone_weights(pretrained.state_dict())
    except ValueError as err:
        raise ConfigError(f"{_phases(cfg)}: {err}; fine-tuning has nothing to start "
                          "from") from None


def _phases(cfg: ExperimentConfig) -> str:
    return (f"pretrain.objective={cfg.pretrain.objective} -> task={cfg.task.name} "
            f"(model={_model(cfg)})")


def validate_servable(cfg: ExperimentConfig, model: nn.Module, task) -> None:
    """A phase that registers models (``tracking.log_models``) must be servable as the
    exporter serves it; ``model`` is :func:`built_model`'s."""
    if not cfg.tracking.log_models:
        return
    import torch

    from models.serving import servable

    try:
        with torch.device("meta"):
            servable(model, multi_label=task.data_needs.multi_label)
    except Exception as err:  # noqa: BLE001 - the exporter would raise it after round 1
        raise ConfigError(f"model={_model(cfg)} with task={cfg.task.name}: the model cannot "
                          f"be exported for serving ({_first_line(err)}); use a model the "
                          "exporter serves or set tracking.log_models=false") from None


def _model(cfg: ExperimentConfig) -> str:
    weights = cfg.model.options.get("weights")
    return cfg.model.name + (f" (model.options.weights={weights})" if weights else "")


def _mode(cfg: ExperimentConfig) -> str:
    mode = cfg.task.options.get("mode")
    return f" (task.options.mode={mode})" if mode not in (None, "full") else ""


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
