"""Handlers of the ``medfed`` commands, one module per concept.

Each handler takes the parsed ``argparse.Namespace`` and returns the exit code. A handler
imports its heavy dependencies (torch, Flower, MLflow, Hydra, pydicom) inside its body, and
``medfed.cli`` imports a handler's module only for the command being run, so ``medfed --help``
and argument errors never pay for them.

- ``data``: synth, ingest
- ``simulate``: simulate
- ``privacy``: privacy, audit
- ``models``: export, convert-weights, predict
- ``deploy``: certs, server, site, run, health, register-site, sites
"""
