"""A MONAI bundle directory read as a pretrained encoder, without running any of it.

A bundle is ``configs/`` (``metadata.json``, ``inference.json`` or ``train.json``, or their
YAML forms) + ``models/model.pt`` (pickle) or ``models/model.safetensors``, often with
``scripts/`` (Python). MONAI's ``ConfigParser`` would evaluate ``"$..."`` expressions, import
``_target_`` paths and run the scripts; we do none of that. We read ONE object, the config's
``network_def``, and take from it:

* ``_target_``: an allow-listed MONAI class (``monai_nets.MONAI_CLASSES``: ``ViT``,
  ``SwinUNETR``, bare or as ``monai.networks.nets.<Class>``);
* every other key: a constructor argument with a plain value; ``"@name"`` is replaced by the
  config's top-level ``name`` if that is itself a plain value (how bundles share
  ``in_channels`` and the like); ``"$..."`` expressions, ``"%..."`` macros, nested ``@a::b``
  references, nested ``_target_`` objects and other ``_key_`` directives are refused, one line.

The result is the same config our own MONAI layout has (``{"model_type", "constructor"}``); the
weights are ``models/*.safetensors``. ``convert_bundle`` turns ``models/model.pt`` into
``models/model.safetensors`` in a copy of the bundle (configs only, never scripts).
"""

from __future__ import annotations

import json
from pathlib import Path

from .monai_nets import MONAI_CLASSES, check_constructor, is_literal, model_type_of_target

CONFIGS_DIR = "configs"
MODELS_DIR = "models"
# Searched in this order for a network_def; metadata.json alone only marks a bundle.
NETWORK_CONFIGS = ("inference.json", "inference.yaml", "inference.yml", "train.json",
                   "train.yaml", "train.yml")
METADATA = "metadata.json"
NETWORK_KEY = "network_def"
BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_PICKLE = "model.pt"
COPIED_SUFFIXES = (".json", ".yaml", ".yml")      # what convert_bundle copies from configs/


def is_bundle(directory: str | Path) -> bool:
    """Whether ``directory`` is laid out as a MONAI bundle (and not as our own layout)."""
    configs = Path(directory) / CONFIGS_DIR
    return configs.is_dir() and any((configs / n).is_file()
                                    for n in (METADATA, *NETWORK_CONFIGS))


def weights_dir(directory: str | Path) -> Path:
    return Path(directory) / MODELS_DIR


def _load_config(path: Path) -> dict:
    from .loading import FoundationLoadError

    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            import yaml

            data = yaml.safe_load(path.read_text())      # safe_load: no Python tags
    except Exception as err:        # JSON/YAML syntax: one line, the parser's reason
        raise FoundationLoadError(f"{path} is not valid {path.suffix[1:].upper()}: "
                                  f"{str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise FoundationLoadError(f"{path} does not hold an object")
    return data


def _resolve(value, config: dict, where: str):
    """A plain argument value, with a top-level ``"@name"`` replaced by that plain value."""
    from .loading import FoundationLoadError

    if isinstance(value, str) and value[:1] in "$%":
        raise FoundationLoadError(
            f"{where}: {value[:40]!r} is a MONAI expression or macro; a bundle's network_def "
            "must give its constructor arguments as plain values (no bundle code is run)")
    if isinstance(value, str) and value.startswith("@"):
        name = value[1:]
        if "::" in name or "#" in name or name not in config:
            raise FoundationLoadError(f"{where}: reference {value!r} is not a top-level key "
                                      "of the config; only plain '@name' references resolve")
        target = config[name]
        if not is_literal(target) or (isinstance(target, str) and target[:1] in "$%@"):
            raise FoundationLoadError(f"{where}: reference {value!r} does not name a plain "
                                      "value")
        return _resolve(target, config, where)
    if isinstance(value, dict):
        if any(k.startswith("_") and k.endswith("_") for k in value):
            raise FoundationLoadError(f"{where}: nested objects to instantiate "
                                      "(_target_ inside an argument) are refused")
        return {k: _resolve(v, config, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, config, where) for v in value]
    return value


def read_bundle_config(directory: str | Path) -> dict:
    """``{"model_type", "constructor", "bundle_config"}`` from the bundle's ``network_def``.

    Raises
    ------
    FoundationLoadError
        No config with a network_def, a class not allow-listed, an argument that is not a
        plain value (or a plain ``@name`` reference to one).
    """
    from .loading import FoundationLoadError

    configs = Path(directory) / CONFIGS_DIR
    found = [configs / n for n in NETWORK_CONFIGS if (configs / n).is_file()]
    for path in found:
        config = _load_config(path)
        if NETWORK_KEY in config:
            break
    else:
        raise FoundationLoadError(f"MONAI bundle {directory} has no {NETWORK_KEY} in "
                                  f"{CONFIGS_DIR}/({' | '.join(NETWORK_CONFIGS)})")
    where = f"{path.relative_to(Path(directory))}: {NETWORK_KEY}"
    net = config[NETWORK_KEY]
    if isinstance(net, str) and net.startswith("@"):
        net = config.get(net[1:])
    if not isinstance(net, dict):
        raise FoundationLoadError(f"{where} must be an object with a _target_")
    target = net.get("_target_")
    model_type = model_type_of_target(target)
    if model_type is None:
        names = sorted(cls for cls, _ in MONAI_CLASSES.values())
        raise FoundationLoadError(f"{where}: _target_ {str(target)[:60]!r} is not an "
                                  f"allow-listed MONAI network; supported: {', '.join(names)} "
                                  "(bare or as monai.networks.nets.<Class>)")
    directives = sorted(k for k in net if k != "_target_" and k.startswith("_"))
    if directives:
        raise FoundationLoadError(f"{where}: directive(s) {directives} are not supported "
                                  "(only _target_ and plain constructor arguments)")
    args = {k: _resolve(v, config, f"{where}.{k}") for k, v in net.items() if k != "_target_"}
    return {"model_type": model_type, "constructor": check_constructor(model_type, args, where),
            "bundle_config": path.name}


def convert_bundle(src: Path, dst: Path, read_state) -> Path:
    """A copy of bundle ``src`` at ``dst`` whose ``models/model.safetensors`` holds the
    tensors of ``src/models/model.pt`` (read by ``read_state(file)``, which never runs
    pickled code); only the configs' JSON/YAML files are copied, never scripts."""
    from safetensors.torch import save_file

    from .loading import PICKLE_SUFFIXES, FoundationLoadError

    read_bundle_config(src)       # refuse a bundle we could not load before writing anything
    models = weights_dir(src)
    file = models / BUNDLE_PICKLE
    if not file.is_file():
        candidates = sorted(p for p in models.glob("*") if p.suffix in PICKLE_SUFFIXES) \
            if models.is_dir() else []
        if len(candidates) != 1:
            raise FoundationLoadError(f"bundle {src} must hold {MODELS_DIR}/{BUNDLE_PICKLE} "
                                      f"(or exactly one pickle checkpoint), found "
                                      f"{len(candidates)}")
        file = candidates[0]
    state = read_state(file)
    (dst / CONFIGS_DIR).mkdir(parents=True, exist_ok=True)
    for path in sorted((src / CONFIGS_DIR).iterdir()):
        if path.suffix in COPIED_SUFFIXES and path.is_file():
            (dst / CONFIGS_DIR / path.name).write_text(path.read_text())
    weights_dir(dst).mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()},
              str(weights_dir(dst) / BUNDLE_WEIGHTS), metadata={"format": "pt"})
    return dst


__all__ = ["BUNDLE_PICKLE", "BUNDLE_WEIGHTS", "CONFIGS_DIR", "MODELS_DIR", "NETWORK_CONFIGS",
           "convert_bundle", "is_bundle", "read_bundle_config", "weights_dir"]
