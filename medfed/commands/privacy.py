"""Privacy commands: read a site's privacy ledger (``privacy``), audit the DP-SGD path
empirically (``audit``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ledger_path(site_dir: Path) -> Path:
    """The site's ledger: ``privacy-dir`` from a simulated site's node-config.toml, else
    <site>/.medfed (a deployed site's ledger is in its ``--privacy-dir``)."""
    from client.privacy.policy import LEDGER_FILE, node_settings, state_dir

    return state_dir(node_settings({}, site_dir, simulated=True), site_dir) / LEDGER_FILE


def privacy(args: argparse.Namespace) -> int:
    """Print the site's per-round privacy spend after verifying the ledger's hash chain."""
    from client.privacy.ledger import PrivacyLedger, format_table, to_json
    from client.privacy.policy import LEDGER_FILE

    path = Path(args.privacy_dir) / LEDGER_FILE if getattr(args, "privacy_dir", None) \
        else _ledger_path(Path(args.site_dir))
    if not path.is_file():
        raise ValueError(f"no privacy ledger at {path}: this site has not trained privately "
                         "(or it keeps its ledger elsewhere: --privacy-dir DIR)")
    entries = PrivacyLedger(path).entries()      # verifies the hash chain first
    if args.json:
        print(json.dumps({"ledger": str(path), "rounds": to_json(entries)}, indent=2))
    else:
        print(f"ledger {path} (hash chain verified, {len(entries)} rounds)")
        print(format_table(entries))
    return 0


def audit(args: argparse.Namespace) -> int:
    """One-run canary audit: exit 0 if the empirical epsilon bound stays within the accounted
    epsilon, 3 if the DP path leaks more than it accounts for."""
    import torch

    from client.data.dataset import StudyDataset
    from client.data.site import load_site
    from client.privacy.audit import AuditConfig, canary_refusal, run_audit
    from client.privacy.onerun import MIN_CANARIES
    from models import MODELS, TASKS
    from protocol.accounting import calibrate_noise

    torch.set_num_threads(1)
    if args.canaries < MIN_CANARIES:      # refused before any data is read or noise calibrated
        raise ValueError(f"--canaries must be at least {MIN_CANARIES} (fewer cannot bound "
                         f"epsilon usefully), got {args.canaries}")
    if args.distributed:
        return _audit_distributed(args)
    if not args.site_dir:
        raise ValueError("the DP-SGD audit trains on a site's data: pass --site-dir (or "
                         "--distributed to audit distributed site-level DP)")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    n_classes = len(args.classes.split(","))
    torch.manual_seed(args.seed)
    model = MODELS.build("mmvit", json.loads(args.model_options) | {"num_classes": n_classes,
                                                                    "img_size": args.image_size})
    refusal = canary_refusal(model, args.canaries)
    if refusal:
        raise ValueError(f"--canaries {args.canaries}: {refusal}; lower --canaries or widen the "
                         "model (--model-options)")
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


def _audit_distributed(args: argparse.Namespace) -> int:
    """The one-run audit of distributed site-level DP (``client.privacy.ddp_audit``)."""
    from client.privacy.ddp_audit import DistributedAuditConfig, run_distributed_audit
    from protocol.accounting import calibrate_noise

    if args.no_noise:
        raise ValueError("--distributed audits the sites' noise shares; use --skip-noise "
                         "N (N = --contributors) for a sum without noise")
    sigma = args.noise_multiplier or calibrate_noise(
        target_epsilon=args.epsilon, delta=args.delta, sample_rate=1.0, steps=args.rounds)
    result = run_distributed_audit(DistributedAuditConfig(
        noise_multiplier=sigma, contributors=args.contributors, skip_noise=args.skip_noise,
        clip_norm=args.max_grad_norm, num_canaries=args.canaries, rounds=args.rounds,
        delta=args.delta, seed=args.seed))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    ok = result["epsilon_lb"] <= result["accounted_epsilon"]
    verdict = "CONSISTENT: empirical lower bound <= accounted epsilon" if ok else \
        "VIOLATION: the distributed DP path leaks more than the sites book"
    print(f"one-run audit (distributed site-level DP): {result['num_canaries']} canary sites, "
          f"{result['rounds']} round(s), {result['contributors']} noise shares "
          f"({result['skip_noise']} skipped), sigma={sigma:.4g}\n"
          f"  guesses {result['num_correct']}/{result['num_guesses']} correct\n"
          f"  empirical epsilon lower bound (95%): {result['epsilon_lb']:.3f}\n"
          f"  accounted epsilon (delta={result['delta']:g}): {result['accounted_epsilon']:.3f}\n"
          f"  {verdict}")
    return 0 if ok else 3
