"""``medfed`` command line: synth, ingest, simulate, export, predict, privacy, audit, the
foundation-model helpers (convert-weights, feature-stats), and the deployment commands (certs,
server, site, site keygen, app digest, run, health, register-site, sites).

Errors a user can fix are reported as one line (``medfed: error: ...``) with exit code 2
(bad input) or 1 (the run failed); tracebacks only with ``--debug``.

This module is the parser and the dispatch only. The handlers live in ``medfed.commands``,
one module per concept, and only the chosen command's module is imported: ``medfed --help``
and argument errors import no torch, Flower, MLflow or Hydra.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from .logs import quiet_third_parties

# Every error a user can fix (ConfigError, SiteDataError, DeployError, ExportError,
# ProvisioningError, PrivacyRefused, ...) is a ValueError, so the dispatcher recognises them
# without importing the (heavy) modules that define them.
USER_ERRORS = (ValueError, FileExistsError)


@dataclass(frozen=True)
class Handler:
    """A command's handler, named rather than imported: ``medfed.commands.<module>.<function>``
    is imported when the command runs, not when the parser is built."""

    module: str
    function: str

    def __call__(self, args: argparse.Namespace) -> int:
        module = importlib.import_module(f"{__package__}.commands.{self.module}")
        return getattr(module, self.function)(args)


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
    p.set_defaults(func=Handler("deploy", "certs"))

    p = sub.add_parser("server", help="start the coordinator: Flower SuperLink with TLS and "
                                      "SuperNode authentication")
    p.add_argument("--certs", required=True, help="output folder of `medfed certs`")
    p.add_argument("--state-dir", required=True,
                   help="SuperLink database, Flower home and run directories")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9093)
    p.add_argument("--authorized-keys",
                   help="folder with <site>/auth.pub to register (default: CERTS/sites)")
    p.add_argument("--control-address",
                   help="addresses/CIDR blocks (comma-separated) allowed to use the Control API "
                        "(submit runs, register keys) on the coordinator port; default: this "
                        "machine only (loopback). Opening it lets anyone there run code at "
                        "every site")
    p.add_argument("--log-file")
    p.add_argument("--startup-timeout", type=float, default=60.0)
    p.add_argument("--link-state", choices=("sqlite", "memory"), default="sqlite",
                   help="Flower's state: STATE/superlink.db (default), or in memory (faster "
                        "messages; a restart forgets sites added with register-site and "
                        "Flower's run list; see deploy/README.md)")
    p.set_defaults(func=Handler("deploy", "server"))

    p = sub.add_parser("site keygen", help="create this site's authentication key pair on the "
                                           "site (auth.key 0600, auth.pub for the coordinator)")
    p.add_argument("--out", required=True, help="folder for auth.key and auth.pub")
    p.add_argument("--site-id", help="the site id (the public key's comment)")
    p.add_argument("--force", action="store_true", help="replace an existing auth.key")
    p.set_defaults(func=Handler("deploy", "site_keygen"))

    p = sub.add_parser("site", help="start a site daemon: Flower SuperNode with node config "
                                    "(`medfed site keygen --out DIR` creates its key)")
    p.add_argument("--site-id", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--superlink", required=True, help="coordinator HOST:PORT")
    p.add_argument("--root-cert", required=True, help="the federation CA certificate")
    p.add_argument("--auth-key", required=True, help="this site's private key (auth.key)")
    p.add_argument("--state-dir", help="Flower home of this site (default DATA_DIR/.medfed/"
                                       "supernode)")
    p.add_argument("--dp-epsilon", type=float, help="the site's privacy budget: epsilon")
    p.add_argument("--dp-delta", type=float, help="the site's privacy budget: delta")
    p.add_argument("--dp-max-assumed-sites", type=int, metavar="M",
                   help="distributed site-level DP (privacy=ddp): refuse rounds whose noise "
                        "share assumes more than M honest contributing sites "
                        "(privacy.min_contributors); unset: the job's number is accepted and "
                        "the round is private only if that many sites in the sum add their "
                        "share (see deploy/README.md)")
    p.add_argument("--require-secagg", action="store_true",
                   help="refuse to send plaintext model updates")
    p.add_argument("--secagg-peers", metavar="FILE",
                   help="the federation's registration list (every site's auth.pub line), "
                        "received out of band: SecAgg+ keys are signed with --auth-key and "
                        "peers are verified against it (malicious-secure secure aggregation)")
    p.add_argument("--secagg-min-neighbours", type=int, default=2,
                   help="refuse SecAgg+ rounds giving this site fewer neighbours (default 2)")
    p.add_argument("--secagg-min-contributors", type=int, default=3,
                   help="refuse SecAgg+ rounds (and survivor sets) of fewer sites (default 3)")
    p.add_argument("--privacy-dir", help="privacy ledger folder (default DATA_DIR/.medfed)")
    p.add_argument("--min-eval-split-size", type=int, metavar="N",
                   help="the smallest count of studies the site reports (default 10): an "
                        "evaluation split of fewer is sent without its metrics or size, and "
                        "the site does not train on fewer labelled studies")
    p.add_argument("--max-model-parameters", type=int, metavar="N",
                   help="refuse jobs whose model has more parameters, every copy its task "
                        "holds counted (default 2e9); sized on the meta device before "
                        "anything is allocated")
    p.add_argument("--max-study-tokens", type=int, metavar="N",
                   help="refuse jobs whose backbone reads more tokens of one study (default "
                        "16384; attention holds their square)")
    p.add_argument("--max-step-tokens", type=int, metavar="N",
                   help="refuse jobs whose training step reads more tokens (batch size x "
                        "tokens of every pass a step makes of a study; default 2^20)")
    p.add_argument("--max-step-activations", type=int, metavar="N",
                   help="refuse jobs whose training step would keep more values for backward "
                        "(tokens x the model's layer widths and attention heads, an upper "
                        "estimate; default 2^36, ~275 GB in float32: set it to your GPU's "
                        "memory in bytes / 4)")
    p.add_argument("--max-evaluations-per-run", type=int, metavar="N",
                   help="evaluate requests the site answers in one run (default 1000)")
    p.add_argument("--max-evaluations-per-day", type=int, metavar="N",
                   help="evaluate requests the site answers over every run in a rolling 24 "
                        "hours (default 2000): each evaluation of weights the coordinator "
                        "chose can count a subset of the site's studies")
    p.add_argument("--max-evaluations-total", type=int, metavar="N",
                   help="evaluate requests the site answers over every run, ever (default "
                        "100000, 50 days at the daily default): a daily cap alone lets that "
                        "channel grow with the days")
    p.add_argument("--unlisted-labels", metavar="NAMES",
                   help="comma-separated label names of this site that a job's class list may "
                        "leave out, or a JSON list of them for names holding a comma (default "
                        "none: a job naming only some of the site's labels is refused, its "
                        "counts could single a label out by difference)")
    p.add_argument("--device", default="auto")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1,
                   help="processes decoding DICOM when the site reads its data (default 1)")
    p.add_argument("--role", choices=("train", "external"), default="train",
                   help="external: evaluate every global model on all labelled studies, never "
                        "train (the server must run with federation.external_sites=true)")
    p.add_argument("--runtime-port", type=int, default=9094,
                   help="local port of the SuperNode's runtime API (one per site on a host)")
    p.add_argument("--poll-interval", type=float, default=0.5,
                   help="seconds an idle site waits before asking the coordinator again for a "
                        "message (Flower: 3; shorter: prompter rounds, more requests to the "
                        "coordinator; see deploy/README.md)")
    p.add_argument("--max-retries", type=int,
                   help="reconnection attempts after a lost connection (default: unbounded)")
    p.add_argument("--max-wait-time", type=float, default=600.0,
                   help="seconds of reconnecting before the site gives up")
    p.add_argument("--allow-app", action="append", metavar="DIGEST",
                   help="approve the app release with this SHA-256 digest (from `medfed app "
                        "digest`; repeatable). Runs of any other app are refused")
    p.add_argument("--allow-list", action="append", metavar="FILE",
                   help="file of approved digests, one per line, # comments (repeatable)")
    p.add_argument("--layout", default="brain_mri_4seq", metavar="NAME|FILE",
                   help="imaging layout the start-up check reads the data with (a shipped "
                        "layout or a YAML file); the site declares it and serves jobs of it")
    p.add_argument("--foundation-dir", metavar="DIR",
                   help="the site's directory of pretrained encoders (node config "
                        "foundation-dir): a foundation-model job names one by a bare name")
    p.set_defaults(func=Handler("deploy", "site"))

    p = sub.add_parser("app digest", help="print the SHA-256 digest of an app release (a .fab "
                                          "file, or the FAB built from a project folder) that "
                                          "a site approves with `medfed site --allow-app`")
    p.add_argument("path", nargs="?", help=".fab file or app folder (default: this MedFed)")
    p.set_defaults(func=Handler("deploy", "app_digest"))

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
    p.add_argument("--dry-run", action="store_true",
                   help="run only the preflight (tracking store, each connected site's "
                        "policy against the experiment): one line per problem (exit 2) or "
                        "'preflight ok' (exit 0); nothing trains")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Flower's own lines of the run's log (its raw metric dump)")
    p.set_defaults(func=Handler("deploy", "run"))

    p = sub.add_parser("health", help="check that the coordinator answers over verified TLS")
    p.add_argument("--superlink", required=True)
    p.add_argument("--root-cert", required=True)
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=Handler("deploy", "health"))

    p = sub.add_parser("sites", help="list the registered sites by name: online/offline and "
                                     "last seen (on the coordinator's machine)")
    p.add_argument("--superlink", required=True, help="coordinator HOST:PORT (127.0.0.1:9093)")
    p.add_argument("--root-cert", required=True, help="the federation CA certificate")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.set_defaults(func=Handler("deploy", "sites"))

    p = sub.add_parser("register-site", help="register a site's public key with a running "
                                             "coordinator")
    p.add_argument("--site-id", required=True)
    p.add_argument("--public-key", required=True, help="the site's auth.pub")
    p.add_argument("--superlink", required=True)
    p.add_argument("--root-cert", required=True)
    p.add_argument("--flwr-home", default=".flwr-deploy")
    p.set_defaults(func=Handler("deploy", "register_site"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfed", description=" ".join(
        __doc__.split("\n\n")[0].split()))
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
    p.add_argument("--layout", default="brain_mri_4seq",
                   choices=("brain_mri_4seq", "chest_xray", "ct_volume"),
                   help="what the sites hold: brain MRI (4 sequences, the demo), chest "
                   "radiographs (CR/DX frontal + lateral, with reports; task=chest3) or CT "
                   "volumes (DICOM series, liver lesions; task=ct3)")
    p.set_defaults(func=Handler("data", "synth"))

    p = sub.add_parser("ingest", help="validate a site directory and report counts")
    p.add_argument("--data-dir", required=True)
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--classes", help="comma-separated label vocabulary (default: any)")
    labels.add_argument("--findings", help="comma-separated finding names: count findings.csv "
                        "(multi-label, e.g. task=findings3) instead of labels.csv")
    p.add_argument("--json", action="store_true")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--layout", help="match the site's series to a layout's channels (a "
                        "shipped name, e.g. chest_xray, or a .yaml path) and print the counts")
    layout.add_argument("--suggest-layout", action="store_true",
                        help="print a layout YAML proposed from the site's Modality x "
                        "SeriesDescription histogram (descriptions in < 5 series suppressed)")
    p.set_defaults(func=Handler("data", "ingest"))

    p = sub.add_parser("simulate", help="run a simulated federation (Hydra overrides follow)")
    p.add_argument("overrides", nargs="*", help="e.g. experiment=demo federation.num_rounds=3")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=Handler("simulate", "simulate"))

    p = sub.add_parser("privacy", help="print a site's privacy ledger (verifies its hash chain)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--site-dir", help="a site's data folder (its ledger in .medfed/, or "
                                          "the privacy-dir its node-config.toml names)")
    where.add_argument("--privacy-dir", help="a deployed site's --privacy-dir")
    p.add_argument("--json", action="store_true", help="per round: q, noise_multiplier, steps, "
                                                       "delta, cumulative epsilon")
    p.set_defaults(func=Handler("privacy", "privacy"))

    p = sub.add_parser("export", help="write a registered model version as a local "
                                      "save_pretrained directory (config.json + safetensors)")
    p.add_argument("--tracking-uri", required=True,
                   help="MLflow store, e.g. sqlite:///runs/<run>/mlflow.db or http://host:5000")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--version", required=True)
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=Handler("models", "export"))

    p = sub.add_parser("convert-weights", help="convert a pickle checkpoint (.bin/.pt/.pth/"
                                               ".ckpt) to safetensors for a foundation model, "
                                               "without running code from it")
    p.add_argument("src", help="the checkpoint file, a directory holding exactly one (or a "
                               "sharded one with its pytorch_model.bin.index.json), or a "
                               "MONAI bundle directory (models/model.pt)")
    p.add_argument("dst", help="directory to write (safetensors + every other file of a SRC "
                               "directory: configs, tokenizer files)")
    p.add_argument("--force", action="store_true", help="write into an existing, non-empty "
                                                        "dst (files of the same name replaced)")
    p.set_defaults(func=Handler("models", "convert_weights"))

    p = sub.add_parser("feature-stats", help="write a foundation model's PUBLIC feature mean "
                                             "and spread (centre_features, scale_features) "
                                             "from a public cohort, built as the run builds it")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="a PUBLIC cohort's directory (DICOM as a site's, or a NIfTI manifest), "
                        "never a site's studies")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="decode processes")
    p.add_argument("--directions", type=int, default=0, metavar="K",
                   help="also the top K principal directions of the centred features "
                        "(project_features=k <= K reads them)")
    p.add_argument("overrides", nargs="*", help="the run's Hydra overrides, e.g. "
                                                "model=foundation model.options.weights=NAME "
                                                "model.foundation_dir=DIR")
    p.set_defaults(func=Handler("models", "feature_stats"))

    p = sub.add_parser("predict", help="score new DICOM studies with a registered model "
                                       "version: its layout and preprocessing, one CSV row "
                                       "per study (pseudonymous key, probabilities, class; "
                                       "a segmenter: lesion voxels, and a mask per study)")
    p.add_argument("--model", required=True, help="models:/NAME/VERSION")
    p.add_argument("--data-dir", required=True, help="site folder with a dicom/ subfolder")
    p.add_argument("--tracking-uri", help="MLflow store, e.g. sqlite:///runs/<run>/mlflow.db "
                                          "(default: MLFLOW_TRACKING_URI)")
    p.add_argument("--privacy-dir", help="the site's state folder holding its pseudonym key, "
                                         "as for `medfed site` (default DATA_DIR/.medfed)")
    p.add_argument("--out", help="CSV file to write (default: stdout); for a segmentation "
                                 "version an existing folder, which receives predictions.csv "
                                 "and masks/<study key>.npy")
    p.add_argument("--force", action="store_true", help="replace an existing --out (or the "
                                                        "predictions in it)")
    p.add_argument("--min-voxels", type=int, default=1,
                   help="segmentation: a study's lesion is present when at least this many "
                        "voxels of its mask are lesion (default 1)")
    p.set_defaults(func=Handler("models", "predict"))

    p = sub.add_parser("audit", help="one-run canary audit of the DP-SGD path on a site's data "
                                     "(or, with --distributed, of distributed site-level DP)")
    p.add_argument("--site-dir", help="DP-SGD audit: the site folder to train on")
    p.add_argument("--distributed", action="store_true",
                   help="audit distributed site-level DP (Skellam shares under SecAgg): canary "
                        "sites in the secure sum, no site data needed")
    p.add_argument("--contributors", type=int, default=3,
                   help="--distributed: noise-adding sites (each share assumes this many)")
    p.add_argument("--skip-noise", type=int, default=0,
                   help="--distributed: of them, how many skip their share (a broken site)")
    p.add_argument("--rounds", type=int, default=1, help="--distributed: releases audited")
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
    p.set_defaults(func=Handler("privacy", "audit"))
    _add_deploy_parsers(sub)
    return parser


# Two-word commands: argparse subcommands are one token, so ``site keygen`` is joined into the
# one parser name before parsing (``site`` alone stays the daemon with its required flags).
TWO_WORD = {("site", "keygen"), ("app", "digest")}


def join_two_word_commands(argv: list[str]) -> list[str]:
    """``[..., "site", "keygen", ...]`` -> ``[..., "site keygen", ...]`` (first command only)."""
    argv = list(argv)
    for i, word in enumerate(argv):
        if not word.startswith("-"):
            if i + 1 < len(argv) and (word, argv[i + 1]) in TWO_WORD:
                argv[i:i + 2] = [f"{word} {argv[i + 1]}"]
            break
    return argv


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code."""
    argv = join_two_word_commands(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    quiet_third_parties()           # before the command imports its dependencies
    try:
        return args.func(args)
    except USER_ERRORS as err:
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
