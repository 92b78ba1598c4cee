"""``medfed`` command line: synth, ingest, simulate, privacy, audit.

Errors a user can fix are reported as one line (``medfed: error: ...``) with exit code 2
(bad input) or 1 (the run failed); tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("medfed")


def _setup_logging(verbose: bool, log_file: Path | None = None) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for stale in list(root.handlers):   # opacus calls logging.basicConfig() on import
        root.removeHandler(stale)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    logging.getLogger("medfed").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("alembic", "mlflow", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Flower has its own console handler; our table replaces its round-by-round dump.
    flwr = logging.getLogger("flwr")
    flwr.propagate = False
    flwr.setLevel(logging.DEBUG if verbose else logging.WARNING)


def cmd_synth(args) -> int:
    from .synth.sites import Scenario, synthesize

    scenario = Scenario(alpha=args.alpha, patients=args.patients,
                        quantity_skew=args.quantity_skew, scanner_shift=args.scanner_shift,
                        missing_fraction=args.missing_fraction, label_fraction=args.label_fraction)
    profiles = synthesize(Path(args.out), n_sites=args.sites, seed=args.seed,
                          external=args.external, scenario=scenario)
    for p in profiles:
        mix = ", ".join(f"{x:.2f}" for x in p.class_probs)
        notes = []
        if p.missing_sequence:
            notes.append(f"{p.missing_sequence} missing in {p.missing_fraction:.0%} of studies")
        if p.label_fraction < 1:
            notes.append(f"{p.label_fraction:.0%} labelled")
        print(f"{p.name:9s} {p.n_patients:4d} patients  class mix [{mix}]  "
              f"noise {p.scanner.noise_sigma:.0f}  {'; '.join(notes)}")
    print(f"wrote {len(profiles)} sites to {args.out}")
    return 0


def cmd_ingest(args) -> int:
    from client.data.site import load_site

    classes = tuple(args.classes.split(",")) if args.classes else None
    data = load_site(Path(args.data_dir), classes)
    report = data.report.as_dict() | {"manifest_fingerprint": data.fingerprint}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print(f"files: {report['files']}   images read: {report['images']}   "
          f"studies: {report['studies']}   fingerprint: {data.fingerprint}")
    for title, key in (("skipped files", "skipped"), ("studies per sequence", "sequences"),
                       ("studies missing a sequence", "studies_missing"), ("labels", "labels"),
                       ("studies per split", "splits")):
        counts = report[key]
        print(f"{title}: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"))
    return 0


def cmd_simulate(args) -> int:
    from server.config import load_experiment

    from .simulation import check_sites, simulate
    from server.federation import new_run_dir

    cfg = load_experiment(args.overrides)
    check_sites(cfg)
    run_dir = new_run_dir(cfg)
    _setup_logging(args.verbose, run_dir / "medfed.log")
    log.info("run directory: %s", run_dir)
    simulate(cfg, run_dir=run_dir)
    uri = cfg.tracking.uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    log.info("open the MLflow UI with:  .venv/bin/mlflow ui --backend-store-uri %s --port 5000", uri)
    return 0


def _ledger_path(site_dir: Path) -> Path:
    """The site's ledger: ``privacy-dir`` from its node-config.toml, else <site>/.medfed."""
    from client.privacy.policy import node_settings
    from strategies import wire

    folder = Path(str(node_settings({}, site_dir).get(wire.NODE_PRIVACY_DIR, ".medfed")))
    return (folder if folder.is_absolute() else site_dir / folder) / "privacy-ledger.sqlite"


def cmd_privacy(args) -> int:
    from client.privacy.ledger import PrivacyLedger, format_table, to_json

    path = _ledger_path(Path(args.site_dir))
    if not path.is_file():
        raise ValueError(f"no privacy ledger at {path}: this site has not trained privately "
                         "(or its node config sets another privacy-dir)")
    entries = PrivacyLedger(path).entries()      # verifies the hash chain first
    if args.json:
        print(json.dumps({"ledger": str(path), "rounds": to_json(entries)}, indent=2))
    else:
        print(f"ledger {path} (hash chain verified, {len(entries)} rounds)")
        print(format_table(entries))
    return 0


def cmd_audit(args) -> int:
    import torch

    from client.data.dataset import StudyDataset
    from client.data.site import load_site
    from client.privacy.audit import AuditConfig, run_audit
    from models import MODELS, TASKS
    from strategies.accounting import calibrate_noise

    torch.set_num_threads(1)
    data = load_site(Path(args.site_dir), tuple(args.classes.split(",")))
    train = StudyDataset(data.split("train", labelled_only=True), image_size=args.image_size)
    if len(train) == 0:
        raise ValueError("the site has no labelled training studies to audit with")
    if args.no_noise:
        sigma = 0.0
    elif args.noise_multiplier:
        sigma = args.noise_multiplier
    else:
        sigma = calibrate_noise(target_epsilon=args.epsilon, delta=args.delta,
                                sample_rate=args.sample_rate, steps=args.steps)
    config = AuditConfig(noise_multiplier=sigma, sample_rate=args.sample_rate, steps=args.steps,
                         num_canaries=args.canaries, delta=args.delta, seed=args.seed,
                         max_grad_norm=args.max_grad_norm)
    n_classes = len(args.classes.split(","))
    torch.manual_seed(args.seed)
    model = MODELS.build("mmvit", json.loads(args.model_options) | {"num_classes": n_classes,
                                                                    "img_size": args.image_size})
    result = run_audit(model, TASKS.build("classification", {"num_classes": n_classes}),
                       train, config)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if sigma == 0:
        verdict = "NOT PRIVATE (no noise): the canaries show epsilon is at least the bound above"
    elif result["epsilon_lb"] <= result["accounted_epsilon"]:
        verdict = "CONSISTENT: empirical lower bound <= accounted epsilon"
    else:
        verdict = "VIOLATION: the DP path leaks more than it accounts for"
    print(f"one-run audit: {result['num_canaries']} gradient canaries, {result['steps']} steps, "
          f"q={result['sample_rate']:g}, sigma={result['noise_multiplier']:.4g}\n"
          f"  guesses {result['num_correct']}/{result['num_guesses']} correct\n"
          f"  empirical epsilon lower bound (95%): {result['epsilon_lb']:.3f}\n"
          f"  accounted epsilon (delta={result['delta']:g}): {result['accounted_epsilon']:.3f}\n"
          f"  {verdict}")
    return 0 if result["epsilon_lb"] <= result["accounted_epsilon"] else 3


def _quiet_third_parties() -> None:
    """Deprecation chatter from dependencies is not actionable for a MedFed user."""
    import os
    import warnings

    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*noload.*")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfed", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic hospital sites (real DICOM)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patients", type=int, default=200, help="mean patients per site")
    p.add_argument("--alpha", type=float, default=2.0, help="Dirichlet label-skew concentration")
    p.add_argument("--quantity-skew", type=float, default=0.3,
                   help="site sizes vary by +/- this fraction of --patients")
    p.add_argument("--scanner-shift", type=float, default=1.0,
                   help="scale of scanner gain/noise differences (0 = identical scanners)")
    p.add_argument("--missing-fraction", type=float, default=0.4,
                   help="share of site-1 studies without T1ce")
    p.add_argument("--label-fraction", type=float, default=0.25,
                   help="share of site-2 studies with a label")
    p.add_argument("--external", action="store_true", help="also write a held-out external site")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("ingest", help="validate a site directory and report counts")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--classes", help="comma-separated label vocabulary (default: any)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("simulate", help="run a simulated federation (Hydra overrides follow)")
    p.add_argument("overrides", nargs="*", help="e.g. experiment=demo federation.num_rounds=3")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("privacy", help="print a site's privacy ledger (verifies its hash chain)")
    p.add_argument("--site-dir", required=True)
    p.add_argument("--json", action="store_true", help="per round: q, noise_multiplier, steps, "
                                                       "delta, cumulative epsilon")
    p.set_defaults(func=cmd_privacy)

    p = sub.add_parser("audit", help="one-run canary audit of the DP-SGD path on a site's data")
    p.add_argument("--site-dir", required=True)
    p.add_argument("--classes", default="high_grade_glioma,low_grade_glioma,cyst")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--epsilon", type=float, default=4.0,
                      help="calibrate the noise to this epsilon over the audit run")
    mode.add_argument("--noise-multiplier", type=float)
    mode.add_argument("--no-noise", action="store_true",
                      help="no noise: the audit must find a large lower bound")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--sample-rate", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model-options", default='{"dim": 32, "depth": 1, "heads": 2}')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    from client.data.site import SiteDataError
    from server.config import ConfigError

    args = build_parser().parse_args(argv)
    _quiet_third_parties()
    try:
        return args.func(args)
    except (ConfigError, SiteDataError, FileExistsError, ValueError) as err:
        if args.debug:
            raise
        print(f"medfed: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - one clear line unless --debug
        if args.debug:
            raise
        cause = err.__cause__ or err
        print(f"medfed: error: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
