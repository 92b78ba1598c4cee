"""Bad deployment input fails with one clear line instead of hanging: wrong CA, expired or
mismatched certificate, unreachable SuperLink, port in use, missing data dir, bad overrides."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medfed.certs import write_certs
from medfed.deploy.preflight import (DeployError, check_port_free, check_server_certificates,
                                     check_superlink)
from medfed.deploy.site import SiteSettings, node_config, node_config_arg
from protocol import wire

from .conftest import free_port, run_medfed


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    write_certs(out, server_name="localhost", sites=["a"])
    return out


def _expired_server_cert(certs, out):
    """A server certificate from the right CA that expired yesterday."""
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=10)).not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    out.mkdir(exist_ok=True)
    (out / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return out / "server.pem", out / "server.key"


class TLSServer:
    """A loopback TLS listener serving a given certificate (stands in for a SuperLink)."""

    def __init__(self, cert, key):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    def close(self):
        self.sock.close()


@pytest.fixture()
def tls_server(certs):
    servers = []

    def start(cert=certs / "server.pem", key=certs / "server.key"):
        servers.append(TLSServer(cert, key))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def test_good_certificate_passes(certs, tls_server):
    server = tls_server()
    check_superlink(f"localhost:{server.port}", certs / "ca.pem")
    check_superlink(f"127.0.0.1:{server.port}", certs / "ca.pem")


def test_wrong_ca(certs, tls_server, tmp_path):
    other = tmp_path / "other"
    write_certs(other, server_name="localhost", sites=[])
    server = tls_server()
    with pytest.raises(DeployError, match="not signed by the CA"):
        check_superlink(f"localhost:{server.port}", other / "ca.pem")


def test_expired_certificate(certs, tls_server, tmp_path):
    cert, key = _expired_server_cert(certs, tmp_path / "expired")
    server = tls_server(cert, key)
    with pytest.raises(DeployError, match="has expired"):
        check_superlink(f"localhost:{server.port}", certs / "ca.pem")
    with pytest.raises(DeployError, match="expired on"):          # the coordinator refuses too
        check_server_certificates(cert, key, certs / "ca.pem")


def test_mismatched_name(tmp_path, tls_server):
    out = tmp_path / "c"
    write_certs(out, server_name="coordinator.example", sites=[], server_ips=("10.9.9.9",))
    server = tls_server(out / "server.pem", out / "server.key")
    with pytest.raises(DeployError, match="mismatched name"):
        check_superlink(f"127.0.0.1:{server.port}", out / "ca.pem")


def test_mismatched_key_and_foreign_certificate(certs, tmp_path):
    other = tmp_path / "other"
    write_certs(other, server_name="localhost", sites=[])
    with pytest.raises(DeployError, match="does not belong"):
        check_server_certificates(certs / "server.pem", other / "server.key", certs / "ca.pem")
    with pytest.raises(DeployError, match="not issued by the CA"):
        check_server_certificates(other / "server.pem", other / "server.key", certs / "ca.pem")


def test_unreachable_superlink(certs):
    with pytest.raises(DeployError, match="cannot reach the SuperLink"):
        check_superlink(f"127.0.0.1:{free_port()}", certs / "ca.pem", timeout=3)


def test_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(DeployError, match="already in use"):
            check_port_free("127.0.0.1", busy.getsockname()[1], "coordinator")


def test_node_config_uses_wire_keys(tmp_path):
    settings = SiteSettings(site_id="a", data_dir=tmp_path, superlink="x:1", root_cert=tmp_path,
                            auth_key=tmp_path, state_dir=tmp_path, dp_epsilon=8.0,
                            dp_delta=1e-5, require_secagg=True, min_report_size=20,
                            unlisted_labels="meningioma, other", max_model_parameters=10**8,
                            max_study_tokens=4096, max_step_tokens=2**18,
                            max_step_activations=2**30, max_evaluations_per_run=50,
                            max_evaluations_per_day=200, max_evaluations_total=3000)
    config = node_config(settings)
    assert (config[wire.NODE_MAX_EVALUATIONS], config[wire.NODE_MAX_DAILY_EVALUATIONS],
            config[wire.NODE_MAX_TOTAL_EVALUATIONS]) == (50, 200, 3000)
    assert config[wire.NODE_SITE_ID] == "a" and config[wire.NODE_DATA_DIR] == str(tmp_path)
    assert config[wire.NODE_DP_EPSILON] == 8.0 and config[wire.NODE_REQUIRE_SECAGG] is True
    assert (config[wire.NODE_MIN_EVAL_SPLIT], config[wire.NODE_UNLISTED_LABELS],
            config[wire.NODE_MAX_MODEL_PARAMETERS], config[wire.NODE_MAX_STUDY_TOKENS],
            config[wire.NODE_MAX_STEP_TOKENS], config[wire.NODE_MAX_STEP_ACTIVATIONS]) == \
        (20, "meningioma, other", 10**8, 4096, 2**18, 2**30)
    from flwr.common.config import parse_config_args      # what the SuperNode will parse
    assert parse_config_args([node_config_arg(config)]) == config
    with pytest.raises(DeployError, match="both --dp-epsilon and --dp-delta"):
        node_config(SiteSettings(site_id="a", data_dir=tmp_path, superlink="x:1",
                                 root_cert=tmp_path, auth_key=tmp_path, state_dir=tmp_path,
                                 dp_epsilon=8.0))


def test_node_config_strings_with_quotes_reach_the_supernode_whole(tmp_path):
    """Flower's --node-config parser cuts a double-quoted value at its first inner quote,
    escaped or not: a JSON list of label names (names holding a comma) or a path with a
    quote would arrive cut, or fail to parse. They go as TOML literal strings; a value
    holding both quote kinds is refused here rather than mangled there."""
    from dataclasses import replace

    from flwr.common.config import parse_config_args

    labels = '["tumour, benign", "other"]'
    base = SiteSettings(site_id="a", data_dir=tmp_path / 'say "cheese"', superlink="x:1",
                        root_cert=tmp_path, auth_key=tmp_path, state_dir=tmp_path,
                        unlisted_labels=labels)
    parsed = parse_config_args([node_config_arg(node_config(base))])
    assert parsed[wire.NODE_UNLISTED_LABELS] == labels
    assert parsed[wire.NODE_DATA_DIR] == str(tmp_path / 'say "cheese"')
    with pytest.raises(DeployError, match="'unlisted-labels' holds both quote kinds"):
        node_config_arg(node_config(replace(base, unlisted_labels='["it\'s", "x"]')))


def test_node_config_carries_an_external_role_and_refuses_unknown_ones(tmp_path):
    from dataclasses import replace

    from flwr.common.config import parse_config_args

    base = SiteSettings(site_id="a", data_dir=tmp_path, superlink="x:1", root_cert=tmp_path,
                        auth_key=tmp_path, state_dir=tmp_path)
    assert wire.NODE_ROLE not in node_config(base)                 # training is the default
    config = node_config(replace(base, role="external"))
    assert parse_config_args([node_config_arg(config)])[wire.NODE_ROLE] == "external"
    with pytest.raises(DeployError, match="--role must be one of train, external"):
        node_config(replace(base, role="observer"))
    for bad in ("", "St Mary's", "../a", "-a", "a" * 65, "site/1"):
        with pytest.raises(DeployError, match="is not a plain name"):
            node_config(replace(base, site_id=bad))
    assert node_config(replace(base, site_id="st-marys_2.icu"))[wire.NODE_SITE_ID] == \
        "st-marys_2.icu"


def test_node_config_declares_the_layout_and_the_foundation_dir(tmp_path, monkeypatch):
    """What the preflight's readiness answer reads (client/readiness.py): the layout the data
    were checked with (a file by its absolute path) and the site's own encoders directory."""
    from dataclasses import replace

    from flwr.common.config import parse_config_args

    monkeypatch.chdir(tmp_path)
    base = SiteSettings(site_id="a", data_dir=tmp_path, superlink="x:1", root_cert=tmp_path,
                        auth_key=tmp_path, state_dir=tmp_path)
    assert node_config(base)[wire.NODE_LAYOUT] == "brain_mri_4seq"
    assert wire.NODE_FOUNDATION_DIR not in node_config(base)
    config = node_config(replace(base, layout="layouts/mine.yaml", foundation_dir="encoders"))
    assert config[wire.NODE_LAYOUT] == str(tmp_path / "layouts" / "mine.yaml")
    assert config[wire.NODE_FOUNDATION_DIR] == str(tmp_path / "encoders")
    assert parse_config_args([node_config_arg(config)]) == config


# ---- the CLI: one line on stderr, exit 2, nothing started ----

def _one_line(result, *needles):
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr)
    assert result.stderr.startswith("medfed: error:") and result.stderr.count("\n") == 1
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_cli_server_port_in_use(certs, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_medfed("server", "--certs", str(certs), "--state-dir", str(tmp_path / "s"),
                            "--host", "127.0.0.1", "--port", str(busy.getsockname()[1]))
    _one_line(result, "already in use")


def test_cli_site_missing_data_dir(certs, tmp_path):
    result = run_medfed("site", "--site-id", "a", "--data-dir", str(tmp_path / "nope"),
                        "--superlink", f"127.0.0.1:{free_port()}",
                        "--root-cert", str(certs / "ca.pem"),
                        "--auth-key", str(certs / "sites" / "a" / "auth.key"))
    _one_line(result, "does not exist")


def test_cli_site_unreachable_superlink(certs, tiny_sites, tmp_path):
    result = run_medfed("site", "--site-id", "a", "--data-dir", str(tiny_sites / "site-0"),
                        "--superlink", f"127.0.0.1:{free_port()}",
                        "--root-cert", str(certs / "ca.pem"),
                        "--auth-key", str(certs / "sites" / "a" / "auth.key"),
                        "--state-dir", str(tmp_path / "node"))
    _one_line(result, "cannot reach the SuperLink")


def test_cli_run_bad_override_fails_before_submitting(certs, tmp_path):
    result = run_medfed("run", "experiment=smoke", "train.nope=1",
                        "--superlink", f"127.0.0.1:{free_port()}",
                        "--root-cert", str(certs / "ca.pem"),
                        "--flwr-home", str(tmp_path / "home"))
    _one_line(result, "train.nope")
    assert not (tmp_path / "home").exists()


@pytest.fixture(scope="module")
def chest_site(tmp_path_factory):
    from medfed.synth.chest import synthesize_chest

    root = tmp_path_factory.mktemp("chest") / "data"
    profiles = synthesize_chest(root, n_sites=1, seed=3, patients=6)
    return root / profiles[0].name


@pytest.mark.parametrize("layout, needle", [
    (None, "no usable studies"),                      # the brain reader finds no MR sequence
    ("chest_xray", "cannot reach the SuperLink"),     # data check passed, next check fails
    ("chest_xray_typo", "unknown layout 'chest_xray_typo'; shipped: brain_mri_4seq"),
])
def test_cli_site_checks_its_data_with_the_layout_it_names(certs, chest_site, tmp_path,
                                                           layout, needle):
    result = run_medfed("site", "--site-id", "a", "--data-dir", str(chest_site),
                        "--superlink", f"127.0.0.1:{free_port()}",
                        "--root-cert", str(certs / "ca.pem"),
                        "--auth-key", str(certs / "sites" / "a" / "auth.key"),
                        "--state-dir", str(tmp_path / "node"),
                        *(["--layout", layout] if layout else []))
    _one_line(result, needle)


def test_cli_run_tracking_server_down_fails_before_submitting(certs, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    result = run_medfed("run", "experiment=smoke", "tracking=server", f"tracking.uri={uri}",
                        "--superlink", f"127.0.0.1:{free_port()}",
                        "--root-cert", str(certs / "ca.pem"),
                        "--flwr-home", str(tmp_path / "home"))
    _one_line(result, f"the MLflow tracking server at {uri} is not reachable")
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server" in result.stderr
    assert not (tmp_path / "home").exists()         # refused before anything was sent
