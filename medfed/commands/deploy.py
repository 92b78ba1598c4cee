"""Deployment commands: certificates (``certs``), the coordinator (``server``), a site daemon
(``site``) and its key (``site keygen``), the digest a site approves (``app digest``), run
submission (``run``), ``health``, ``register-site`` and the list of registered ``sites``."""

from __future__ import annotations

import argparse
from pathlib import Path

from medfed.logs import setup_logging


def certs(args: argparse.Namespace) -> int:
    """Write (or keep) the CA, the coordinator's certificate and per-site keys."""
    from medfed.certs import write_certs

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


def site_keygen(args: argparse.Namespace) -> int:
    """Create the site's key pair on the site; print the public key for the coordinator."""
    from medfed.certs import site_keygen as keygen

    key = keygen(Path(args.out), site=args.site_id, force=args.force)
    print(f"created  {key.private} (private, mode 0600: never leaves this machine)")
    print(f"created  {key.public}")
    print(key.public_line)
    print(f"send {key.public.name} (or the line above) to the coordinator's operator, who runs "
          f"`medfed register-site --site-id {args.site_id or '<site>'} --public-key "
          f"{key.public.name} ...`; start the site with --auth-key {key.private}")
    return 0


def server(args: argparse.Namespace) -> int:
    """Start the coordinator and supervise it until it stops; its exit code is ours."""
    from medfed.deploy.coordinator import Coordinator, CoordinatorSettings

    setup_logging(deploy=True)
    settings = CoordinatorSettings(
        certs=Path(args.certs).resolve(), state_dir=Path(args.state_dir).resolve(),
        host=args.host, port=args.port,
        authorized_keys=Path(args.authorized_keys).resolve() if args.authorized_keys else None,
        log_file=Path(args.log_file).resolve() if args.log_file else None,
        link_state=args.link_state,
        **({"control_from": tuple(args.control_address.split(","))}
           if args.control_address else {}))
    coordinator = Coordinator(settings)
    try:
        coordinator.start(startup_timeout=args.startup_timeout)
    except BaseException:
        coordinator.stop()
        raise
    return coordinator.supervise()


def site(args: argparse.Namespace) -> int:
    """Start a site daemon (SuperNode with the site's node config) and supervise it."""
    from medfed.deploy.allowlist import AllowList
    from medfed.deploy.site import Site, SiteSettings

    setup_logging(deploy=True)
    state_dir = Path(args.state_dir or Path(args.data_dir) / ".medfed" / "supernode").resolve()
    allow = AllowList.build(args.allow_app or [],
                            [Path(f) for f in (args.allow_list or [])])
    settings = SiteSettings(
        site_id=args.site_id, data_dir=Path(args.data_dir).resolve(), superlink=args.superlink,
        root_cert=Path(args.root_cert).resolve(), auth_key=Path(args.auth_key).resolve(),
        state_dir=state_dir, allow=allow,
        dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta, require_secagg=args.require_secagg,
        dp_max_assumed_sites=args.dp_max_assumed_sites,
        privacy_dir=args.privacy_dir, device=args.device, torch_threads=args.torch_threads,
        decode_workers=args.decode_workers,
        runtime_port=args.runtime_port, poll_interval=args.poll_interval,
        max_retries=args.max_retries,
        max_wait_time=args.max_wait_time, role=args.role, layout=args.layout,
        foundation_dir=args.foundation_dir,
        secagg_peers=Path(args.secagg_peers).resolve() if args.secagg_peers else None,
        secagg_min_neighbours=args.secagg_min_neighbours,
        secagg_min_contributors=args.secagg_min_contributors,
        min_report_size=args.min_eval_split_size, unlisted_labels=args.unlisted_labels,
        max_model_parameters=args.max_model_parameters,
        max_study_tokens=args.max_study_tokens, max_step_tokens=args.max_step_tokens,
        max_step_activations=args.max_step_activations,
        max_evaluations_per_run=args.max_evaluations_per_run,
        max_evaluations_per_day=args.max_evaluations_per_day,
        max_evaluations_total=args.max_evaluations_total)
    daemon = Site(settings)
    try:
        daemon.start()
    except BaseException:
        daemon.stop(grace=5)
        raise
    return daemon.supervise()


def app_digest(args: argparse.Namespace) -> int:
    """Print the digest a site approves with ``medfed site --allow-app``."""
    from medfed.deploy.allowlist import digest_of
    from medfed.deploy.preflight import DeployError
    from medfed.simulation import PROJECT_ROOT

    path = Path(args.path) if args.path else PROJECT_ROOT
    if not path.exists():
        raise DeployError(f"{path} does not exist (a .fab file or a Flower app folder)")
    print(digest_of(path))
    return 0


def run(args: argparse.Namespace) -> int:
    """Submit an experiment to the coordinator and stream it to the end (``--dry-run``: its
    preflight only)."""
    from medfed.deploy.submit import RunRequest, submit
    from medfed.simulation import PROJECT_ROOT

    setup_logging(args.verbose, deploy=True)
    request = RunRequest(overrides=list(args.overrides), superlink=args.superlink,
                         root_cert=Path(args.root_cert),
                         app_dir=Path(args.app_dir) if args.app_dir else PROJECT_ROOT,
                         flwr_home=Path(args.flwr_home), wait_sites=args.wait_sites,
                         wait_timeout=args.wait_timeout, dry_run=args.dry_run,
                         verbose=args.verbose)
    return submit(request)


def health(args: argparse.Namespace) -> int:
    """Check the SuperLink over verified TLS, then ask it whether it is healthy."""
    from medfed.deploy.coordinator import healthy
    from medfed.deploy.preflight import check_superlink

    check_superlink(args.superlink, Path(args.root_cert), timeout=args.timeout)
    if not healthy(args.superlink, Path(args.root_cert), timeout=args.timeout):
        raise RuntimeError(f"the SuperLink at {args.superlink} does not report healthy")
    print(f"ok: SuperLink {args.superlink} is healthy (TLS verified)")
    return 0


def register_site(args: argparse.Namespace) -> int:
    """Register a site's public key with a running coordinator (idempotent)."""
    from medfed.deploy.coordinator import register_site as register, write_connection

    home = Path(args.flwr_home)
    write_connection(home, args.superlink, Path(args.root_cert))
    outcome = register(Path(args.public_key), args.site_id, home)
    print(f"site {args.site_id}: {'registered' if outcome == 'registered' else 'already registered'}")
    return 0


def sites(args: argparse.Namespace) -> int:
    """List the registered sites by name, online or offline, and when each was last seen."""
    from medfed.deploy.sites import show_sites

    return show_sites(args.superlink, Path(args.root_cert), as_json=args.json)
