"""``medfed`` command line: synth, ingest, simulate, export, privacy, audit, and the deployment
commands (certs, server, site, run, health, register-site).

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

    if args.findings:       # multi-label: findings.csv, counted per finding
        data = load_site(Path(args.data_dir), tuple(args.findings.split(",")), multi_label=True)
    else:
        classes = tuple(args.classes.split(",")) if args.classes else None
        data = load_site(Path(args.data_dir), classes)
    report = data.report.as_dict() | {"manifest_fingerprint": data.fingerprint}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print(f"files: {report['files']}   images read: {report['images']}   "
          f"studies: {report['studies']}   fingerprint: {data.fingerprint}")
    for title, key in (("skipped files", "skipped"), ("studies per sequence", "sequences"),
                       ("studies missing a sequence", "studies_missing"),
                       ("findings" if args.findings else "labels", "labels"),
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
    from protocol import wire

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


def cmd_export(args) -> int:
    from .export import export_version

    out = export_version(args.tracking_uri, args.model, args.version, Path(args.out),
                         force=args.force)
    print(f"exported {args.model} version {args.version} to {out} "
          f"(start a run from it with model.pretrained={out})")
    return 0


def cmd_audit(args) -> int:
    import torch

    from client.data.dataset import StudyDataset
    from client.data.site import load_site
    from client.privacy.audit import AuditConfig, run_audit
    from models import MODELS, TASKS
    from protocol.accounting import calibrate_noise

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


# ---- deployment: certificates, coordinator, site daemon, run submission ----

def _deploy_logging() -> None:
    """Deployment daemons log every line with a time and (via the tag) who wrote it."""
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(fmt)
    root = logging.getLogger()
    # opacus calls logging.basicConfig at import; one format only
    for h in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(h)
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    for noisy in ("alembic", "mlflow", "urllib3", "git", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_certs(args) -> int:
    from .certs import write_certs

    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else []
    ips = tuple(dict.fromkeys(["127.0.0.1", *(args.server_ip or [])]))
    report = write_certs(Path(args.out), server_name=args.server_name, sites=sites,
                         server_ips=ips, extra_dns=tuple(args.server_dns or []), days=args.days,
                         force=args.force)
    for name in report.created:
        print(f"created  {name}")
    for name in report.kept:
        print(f"kept     {name}")
    print(f"certificates in {report.out} (private keys mode 0600); give each hospital "
          "sites/<site>/ (auth.key, ca.pem), register sites/<site>/auth.pub on the coordinator")
    return 0


def cmd_server(args) -> int:
    from .deploy.coordinator import Coordinator, CoordinatorSettings

    _deploy_logging()
    settings = CoordinatorSettings(
        certs=Path(args.certs).resolve(), state_dir=Path(args.state_dir).resolve(),
        host=args.host, port=args.port,
        authorized_keys=Path(args.authorized_keys).resolve() if args.authorized_keys else None,
        log_file=Path(args.log_file).resolve() if args.log_file else None)
    coordinator = Coordinator(settings)
    try:
        coordinator.start(startup_timeout=args.startup_timeout)
    except BaseException:
        coordinator.stop()
        raise
    return coordinator.supervise()


def cmd_site(args) -> int:
    from .deploy.site import Site, SiteSettings

    _deploy_logging()
    settings = SiteSettings(
        site_id=args.site_id, data_dir=Path(args.data_dir).resolve(), superlink=args.superlink,
        root_cert=Path(args.root_cert).resolve(), auth_key=Path(args.auth_key).resolve(),
        state_dir=Path(args.state_dir or Path(args.data_dir) / ".medfed" / "supernode").resolve(),
        dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta, require_secagg=args.require_secagg,
        privacy_dir=args.privacy_dir, device=args.device, torch_threads=args.torch_threads,
        runtime_port=args.runtime_port, max_retries=args.max_retries,
        max_wait_time=args.max_wait_time, role=args.role)
    site = Site(settings)
    try:
        site.start()
    except BaseException:
        if site.daemon is not None:
            site.daemon.stop(grace=5)
        raise
    return site.supervise()


def cmd_run(args) -> int:
    from .deploy.submit import RunRequest, submit
    from .simulation import PROJECT_ROOT

    _deploy_logging()
    request = RunRequest(overrides=list(args.overrides), superlink=args.superlink,
                         root_cert=Path(args.root_cert),
                         app_dir=Path(args.app_dir) if args.app_dir else PROJECT_ROOT,
                         flwr_home=Path(args.flwr_home), wait_sites=args.wait_sites,
                         wait_timeout=args.wait_timeout)
    return submit(request)


def cmd_health(args) -> int:
    from .deploy.coordinator import healthy
    from .deploy.preflight import check_superlink

    check_superlink(args.superlink, Path(args.root_cert), timeout=args.timeout)
    if not healthy(args.superlink, Path(args.root_cert), timeout=args.timeout):
        raise RuntimeError(f"the SuperLink at {args.superlink} does not report healthy")
    print(f"ok: SuperLink {args.superlink} is healthy (TLS verified)")
    return 0


def cmd_register_site(args) -> int:
    from .deploy.coordinator import register_site, write_connection

    home = Path(args.flwr_home)
    write_connection(home, args.superlink, Path(args.root_cert))
    outcome = register_site(Path(args.public_key), args.site_id, home)
    print(f"site {args.site_id}: {'registered' if outcome == 'registered' else 'already registered'}")
    return 0


def _add_deploy_parsers(sub) -> None:
    p = sub.add_parser("certs", help="write a CA, the coordinator's TLS certificate and "
                                     "per-site authentication keys")
    p.add_argument("--out", required=True)
    p.add_argument("--server-name", required=True,
                   help="DNS name sites use to reach the coordinator")
    p.add_argument("--server-ip", action="append",
                   help="an IP address for the server certificate (repeatable; 127.0.0.1 is "
                        "always included)")
    p.add_argument("--server-dns", action="append", help="a further DNS name (repeatable)")
    p.add_argument("--sites", default="", help="comma-separated site ids, e.g. a,b,c")
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--force", action="store_true",
                   help="replace existing CA, server certificate and the named sites' keys")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("server", help="start the coordinator: Flower SuperLink with TLS and "
                                      "SuperNode authentication")
    p.add_argument("--certs", required=True, help="output folder of `medfed certs`")
    p.add_argument("--state-dir", required=True,
                   help="SuperLink database, Flower home and run directories")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9093)
    p.add_argument("--authorized-keys",
                   help="folder with <site>/auth.pub to register (default: CERTS/sites)")
    p.add_argument("--log-file")
    p.add_argument("--startup-timeout", type=float, default=60.0)
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("site", help="start a site daemon: Flower SuperNode with node config")
    p.add_argument("--site-id", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--superlink", required=True, help="coordinator HOST:PORT")
    p.add_argument("--root-cert", required=True, help="the federation CA certificate")
    p.add_argument("--auth-key", required=True, help="this site's private key (auth.key)")
    p.add_argument("--state-dir", help="Flower home of this site (default DATA_DIR/.medfed/"
                                       "supernode)")
    p.add_argument("--dp-epsilon", type=float, help="the site's privacy budget: epsilon")
    p.add_argument("--dp-delta", type=float, help="the site's privacy budget: delta")
    p.add_argument("--require-secagg", action="store_true",
                   help="refuse to send plaintext model updates")
    p.add_argument("--privacy-dir", help="privacy ledger folder (default DATA_DIR/.medfed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--role", choices=("train", "external"), default="train",
                   help="external: evaluate every global model on all labelled studies, never "
                        "train (the server must run with federation.external_sites=true)")
    p.add_argument("--runtime-port", type=int, default=9094,
                   help="local port of the SuperNode's runtime API (one per site on a host)")
    p.add_argument("--max-retries", type=int,
                   help="reconnection attempts after a lost connection (default: unbounded)")
    p.add_argument("--max-wait-time", type=float, default=600.0,
                   help="seconds of reconnecting before the site gives up")
    p.set_defaults(func=cmd_site)

    p = sub.add_parser("run", help="submit an experiment to the coordinator and stream it")
    p.add_argument("overrides", nargs="*", help="e.g. experiment=demo federation.num_rounds=3")
    p.add_argument("--superlink", required=True, help="coordinator HOST:PORT")
    p.add_argument("--root-cert", required=True, help="the federation CA certificate")
    p.add_argument("--flwr-home", default=".flwr-deploy",
                   help="Flower CLI home for this connection")
    p.add_argument("--app-dir", help="the Flower app (default: this project)")
    p.add_argument("--wait-sites", type=int, default=0,
                   help="wait until this many sites are online before submitting")
    p.add_argument("--wait-timeout", type=float, default=300.0)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("health", help="check that the coordinator answers over verified TLS")
    p.add_argument("--superlink", required=True)
    p.add_argument("--root-cert", required=True)
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("register-site", help="register a site's public key with a running "
                                             "coordinator")
    p.add_argument("--site-id", required=True)
    p.add_argument("--public-key", required=True, help="the site's auth.pub")
    p.add_argument("--superlink", required=True)
    p.add_argument("--root-cert", required=True)
    p.add_argument("--flwr-home", default=".flwr-deploy")
    p.set_defaults(func=cmd_register_site)


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
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--classes", help="comma-separated label vocabulary (default: any)")
    labels.add_argument("--findings", help="comma-separated finding names: count findings.csv "
                        "(multi-label, e.g. task=findings3) instead of labels.csv")
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

    p = sub.add_parser("export", help="write a registered model version as a local "
                                      "save_pretrained directory (config.json + safetensors)")
    p.add_argument("--tracking-uri", required=True,
                   help="MLflow store, e.g. sqlite:///runs/<run>/mlflow.db or http://host:5000")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--version", required=True)
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_export)

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
    _add_deploy_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from client.data.site import SiteDataError
    from server.config import ConfigError

    args = build_parser().parse_args(argv)
    _quiet_third_parties()
    try:
        return args.func(args)
    except (ConfigError, SiteDataError, FileExistsError, ValueError) as err:   # incl. ExportError
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
