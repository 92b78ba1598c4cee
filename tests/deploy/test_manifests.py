"""deploy/ is consistent with the real CLI (no Docker engine or helm here: static checks).

Every ``medfed`` command line in compose, the Dockerfiles and the Helm templates is parsed by
``medfed.cli.build_parser()``: an unknown or missing flag fails here, not at a hospital.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from medfed.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
SITES = ("site-a", "site-b", "site-c")
COORDINATOR_CIDR = "203.0.113.10/32"      # what a hospital's operator sets (documentation range)
APP_DIGEST = "ab" * 32                    # the release it approved (`medfed app digest`)
SITE_REQUIRED = {"coordinator.cidr": COORDINATOR_CIDR, "app.digest": APP_DIGEST}


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` -> default (the values a fresh checkout runs with)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _parse(command: str, args: list[str]):
    """Parse ``medfed COMMAND ARGS`` with the real parser (argparse exits on a bad flag)."""
    try:
        return build_parser().parse_args([command, *[_interpolate(str(a)) for a in args]])
    except SystemExit as err:
        pytest.fail(f"`medfed {command} {' '.join(map(str, args))}` is not a valid command "
                    f"line (exit {err.code})")


def _mount_targets(service: dict) -> dict[str, str]:
    """Container path -> source for every volume of a compose service."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def _covered(path: str, targets: dict[str, str]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets)


def _dockerfile(name: str) -> str:
    return (DEPLOY / "docker" / name).read_text()


def _healthcheck(name: str) -> list[str]:
    """The command of a Dockerfile's HEALTHCHECK (its ``CMD [...]`` continuation line)."""
    line = next(ln for ln in _dockerfile(name).splitlines() if ln.strip().startswith("CMD ["))
    return yaml.safe_load(line.strip()[4:])


def _json_instruction(text: str, instruction: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(instruction + " "))
    return yaml.safe_load(line[len(instruction) + 1:])


def test_compose_services():
    assert set(SERVICES) == {"postgres", "mlflow", "coordinator", *SITES}
    assert set(COMPOSE["volumes"]) >= {"pgdata", "coordinator-state",
                                       *(f"{s}-data" for s in SITES)}


def test_coordinator_command_matches_cli_and_ports():
    server = SERVICES["coordinator"]
    entry = _json_instruction(_dockerfile("server.Dockerfile"), "ENTRYPOINT")
    assert entry == ["medfed", "server"]
    args = _parse("server", server["command"])
    assert server["ports"] == [f"{args.port}:{args.port}"]
    assert f"EXPOSE {args.port}" in _dockerfile("server.Dockerfile")
    default = _parse("server", _json_instruction(_dockerfile("server.Dockerfile"), "CMD"))
    assert default.port == args.port and default.state_dir == args.state_dir
    mounts = _mount_targets(server)
    assert mounts[args.state_dir] == "coordinator-state"
    for name in ("ca.pem", "server.pem", "server.key"):
        assert f"{args.certs}/{name}" in mounts
    pubs = [t for t in mounts if t.endswith("/auth.pub")]
    assert sorted(pubs) == [f"{args.certs}/sites/{s}/auth.pub" for s in SITES]
    assert not [s for s in mounts.values() if s.endswith("auth.key")]   # no site private key


def test_sites_each_have_own_data_key_and_reach_the_coordinator():
    coordinator = _parse("server", SERVICES["coordinator"]["command"])
    data_volumes, keys = set(), set()
    for name in SITES:
        service = SERVICES[name]
        args = _parse("site", service["command"])
        assert args.site_id == name
        host, port = args.superlink.rsplit(":", 1)
        assert host == "coordinator" and int(port) == coordinator.port
        mounts = _mount_targets(service)
        for path in (args.data_dir, args.root_cert, args.auth_key, args.state_dir,
                     args.privacy_dir):
            assert _covered(path, mounts), (name, path)
        data_volumes.add(mounts[args.data_dir])
        keys.add(mounts[args.auth_key])
        assert mounts[args.auth_key] == f"./certs/sites/{name}/auth.key"
        assert "ports" not in service                       # outbound only
        # only approved app releases run: the allow-list file is mounted read-only
        assert args.allow_list and all(_covered(f, mounts) for f in args.allow_list)
        assert all(spec.endswith(":ro") for spec in service["volumes"]
                   if spec.split(":")[1] in args.allow_list)
        assert service["environment"]["OMP_NUM_THREADS"] == "1"
    assert len(data_volumes) == len(keys) == len(SITES)
    assert _json_instruction(_dockerfile("site.Dockerfile"), "ENTRYPOINT") == ["medfed", "site"]


def test_mlflow_uses_postgres_and_no_job_execution():
    mlflow = SERVICES["mlflow"]
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    command = [_interpolate(str(a)) for a in mlflow["command"]]
    backend = command[command.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql://") and "@postgres:5432/" in backend
    assert "mlflow" in SERVICES["coordinator"]["depends_on"]
    postgres = SERVICES["postgres"]["environment"]
    assert f"{postgres['POSTGRES_USER']}:" in backend and backend.endswith(postgres["POSTGRES_DB"])


@pytest.mark.parametrize("name", ["server.Dockerfile", "site.Dockerfile"])
def test_dockerfiles_install_torch_first_then_constraints(name):
    text = _dockerfile(name)
    assert "ARG VARIANT=cpu" in text and '"$VARIANT" = "cuda"' in text
    assert text.index("pip install torch==2.13.0") < text.index("pip install -c /tmp/constraints.txt")
    assert "USER medfed" in text
    command = _healthcheck(name)
    if command[0] == "medfed":
        _parse(command[1], command[2:])
    # every package pyproject installs is copied into the image (protocol/ was not)
    pyproject = (DEPLOY.parent / "pyproject.toml").read_text()
    include = re.search(r"\[tool.setuptools.packages.find\]\ninclude = \[(.*?)\]", pyproject)
    packages = re.findall(r'"(\w+)\*"', include.group(1))
    assert packages and all(f"COPY {pkg} {pkg}" in text for pkg in packages), packages


# ---- Helm: a small renderer for the template subset the charts use ----

def _lookup(values: dict, dotted: str, release: str):
    if dotted == ".Release.Name":
        return release
    assert dotted.startswith(".Values."), dotted
    node = values
    for part in dotted[len(".Values."):].split("."):
        assert isinstance(node, dict) and part in node, f"{dotted} is not in values.yaml"
        node = node[part]
    return node


class HelmFail(Exception):
    """What ``helm template`` would stop with (a ``fail`` or ``required`` in a template)."""


def _expression(expr: str, values: dict, release: str) -> str:
    parts = [p.strip() for p in expr.split("|")]
    required = re.fullmatch(r'required "([^"]*)" (\S+)', parts[0])
    if required:
        value = _lookup(values, required.group(2), release)
        if value in (None, "", [], {}):
            raise HelmFail(required.group(1))
    else:
        value = _lookup(values, parts[0], release)
    for fn in parts[1:]:
        assert fn == "quote", f"unsupported template function {fn}"
        value = f'"{value}"'
    return str(value)


def _condition(expr: str, values: dict, release: str) -> bool:
    """``PATH``, ``not PATH`` or ``eq PATH "literal"``."""
    negate = expr.startswith("not ")
    expr = expr[4:].strip() if negate else expr
    eq = re.fullmatch(r'eq (\S+) "([^"]*)"', expr)
    value = (_lookup(values, eq.group(1), release) == eq.group(2) if eq
             else bool(_lookup(values, expr, release)))
    return value != negate


def render(template: str, values: dict, release: str = "rel") -> str:
    """Render the subset of Go templates used in deploy/helm (if [not|eq]/else/end, ``fail``,
    ``required``, ``.Values`` paths, ``| quote``, ``toYaml ... | nindent N``); anything else
    fails the test. A ``fail``/``required`` that fires raises ``HelmFail``."""
    out, stack = [], []
    for line in template.splitlines():
        failing = re.fullmatch(r'\s*\{\{-?\s*fail "([^"]*)"\s*-?\}\}\s*', line)
        if failing:
            if all(stack):
                raise HelmFail(failing.group(1))
            continue
        control = re.fullmatch(r"\s*\{\{-?\s*(if|else|end)\b(.*?)-?\}\}\s*", line)
        if control:
            word, rest = control.group(1), control.group(2).strip()
            if word == "if":
                stack.append(_condition(rest, values, release))
            elif word == "else":
                stack[-1] = not stack[-1]
            else:
                stack.pop()
            continue
        if not all(stack):
            continue
        to_yaml = re.fullmatch(r"\s*\{\{-?\s*toYaml (\S+) \| nindent (\d+)\s*-?\}\}\s*", line)
        if to_yaml:
            dumped = yaml.safe_dump(_lookup(values, to_yaml.group(1), release),
                                    default_flow_style=False).splitlines()
            out += [" " * int(to_yaml.group(2)) + d for d in dumped]
            continue
        out.append(re.sub(r"\{\{-?\s*(.*?)\s*-?\}\}",
                          lambda m: _expression(m.group(1), values, release), line))
    assert not stack, "unbalanced if/end"
    return "\n".join(out)


def _chart(name: str, overrides: dict | None = None) -> tuple[dict, dict[str, dict]]:
    chart = DEPLOY / "helm" / name
    assert yaml.safe_load((chart / "Chart.yaml").read_text())["name"] == name
    values = yaml.safe_load((chart / "values.yaml").read_text())
    for dotted, value in (overrides or {}).items():
        node = values
        *path, last = dotted.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    docs = {}
    for path in sorted((chart / "templates").glob("*.yaml")):
        doc = yaml.safe_load(render(path.read_text(), values))
        docs[doc["kind"]] = doc
    return values, docs


def _container_args(workload: dict) -> tuple[dict, list[str]]:
    container = workload["spec"]["template"]["spec"]["containers"][0]
    return container, [str(a) for a in container["args"]]


def test_coordinator_chart_matches_cli():
    values, docs = _chart("medfed-coordinator")
    container, args = _container_args(docs["StatefulSet"])
    parsed = _parse("server", args)
    assert parsed.port == values["port"] == docs["Service"]["spec"]["ports"][0]["port"]
    assert container["ports"][0]["containerPort"] == parsed.port
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {parsed.certs, parsed.authorized_keys, parsed.state_dir} <= mounts
    probe = container["readinessProbe"]["exec"]["command"]
    health = _parse(probe[1], probe[2:])
    assert health.superlink.endswith(f":{parsed.port}")
    assert {e["name"]: e["value"] for e in container["env"]}["OMP_NUM_THREADS"] == "1"
    notes = render((DEPLOY / "helm/medfed-coordinator/templates/NOTES.txt").read_text(), values)
    run_line = " ".join(ln.strip().rstrip("\\") for ln in notes.splitlines()[2:])
    words = shlex.split(run_line)
    _parse("run", words[words.index("run") + 1:])


@pytest.mark.parametrize("privacy", [{}, {"privacy.epsilon": "8", "privacy.delta": "1e-5",
                                          "privacy.requireSecagg": True}])
def test_site_chart_matches_cli_and_is_outbound_only(privacy):
    values, docs = _chart("medfed-site", {**privacy, **SITE_REQUIRED})
    container, args = _container_args(docs["Deployment"])
    parsed = _parse("site", args)
    assert parsed.site_id == values["site"]["id"]
    assert parsed.superlink == values["coordinator"]["address"]
    assert parsed.require_secagg == bool(privacy)
    assert (parsed.dp_epsilon, parsed.dp_delta) == ((8.0, 1e-5) if privacy else (None, None))
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path in (parsed.data_dir, parsed.root_cert, parsed.auth_key, parsed.state_dir):
        assert _covered(path, mounts), path
    assert mounts[parsed.data_dir]["readOnly"] is True
    _check_site_liveness_probe(container["livenessProbe"], parsed.runtime_port)
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["ingress"] == [] and set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["egress"][0]["ports"][0]["port"] == int(parsed.superlink.rsplit(":", 1)[1])


def _check_site_liveness_probe(probe: dict, runtime_port: int) -> None:
    """The kubelet runs an httpGet probe from the node, so ``host: 127.0.0.1`` is the node's
    loopback and the site's runtime API (pod loopback only) never answers it: the pod would be
    restarted every few minutes. The probe must run inside the pod, as the image's own
    HEALTHCHECK does, against the runtime port the site listens on."""
    assert set(probe) & {"httpGet", "tcpSocket", "grpc"} == set()
    command = probe["exec"]["command"]
    assert command == _healthcheck("site.Dockerfile")
    assert f"'http://127.0.0.1:{runtime_port}/health', timeout=4)" in command[-1]
    assert probe["timeoutSeconds"] > 4                    # the check's own urlopen timeout


# ---- closed by default: what a security officer signs off ----

def test_compose_publishes_only_the_fleet_port_and_keeps_control_on_loopback():
    coordinator = _parse("server", SERVICES["coordinator"]["command"])
    published = {name: svc["ports"] for name, svc in SERVICES.items() if svc.get("ports")}
    assert published == {"coordinator": [f"{coordinator.port}:{coordinator.port}"]}
    assert coordinator.control_address is None          # Control API: this machine only


def test_coordinator_chart_defaults_to_clusterip_and_loopback_control():
    values, docs = _chart("medfed-coordinator")
    assert values["service"]["type"] == "ClusterIP"
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    assert "loadBalancerSourceRanges" not in docs["Service"]["spec"]
    _, args = _container_args(docs["StatefulSet"])
    assert _parse("server", args).control_address is None


def test_coordinator_chart_refuses_a_loadbalancer_open_to_everyone():
    with pytest.raises(HelmFail, match="loadBalancerSourceRanges"):
        _chart("medfed-coordinator", {"service.type": "LoadBalancer"})
    ranges = ["198.51.100.0/24", "203.0.113.7/32"]
    _, docs = _chart("medfed-coordinator", {"service.type": "LoadBalancer",
                                            "service.loadBalancerSourceRanges": ranges})
    assert docs["Service"]["spec"]["type"] == "LoadBalancer"
    assert docs["Service"]["spec"]["loadBalancerSourceRanges"] == ranges


@pytest.mark.parametrize("cidr", ["", "0.0.0.0/0", "::/0"])
def test_site_chart_refuses_egress_to_anywhere(cidr):
    with pytest.raises(HelmFail, match="coordinator.cidr"):
        _chart("medfed-site", {**SITE_REQUIRED, "coordinator.cidr": cidr})


def test_site_egress_is_pinned_to_the_coordinator_address():
    defaults = yaml.safe_load((DEPLOY / "helm/medfed-site/values.yaml").read_text())
    assert not defaults["coordinator"]["cidr"]             # the operator must set it
    _, docs = _chart("medfed-site", SITE_REQUIRED)
    egress = docs["NetworkPolicy"]["spec"]["egress"]
    assert egress[0]["to"] == [{"ipBlock": {"cidr": COORDINATOR_CIDR}}]
    # every other rule is DNS only, and to the cluster's DNS pods only: no second way out
    dns = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    assert len(egress) == 2
    assert all({p["port"] for p in rule["ports"]} == {53} and rule["to"] == dns
               for rule in egress[1:])


def test_site_dns_egress_follows_values_and_refuses_an_empty_selector():
    _, docs = _chart("medfed-site", {**SITE_REQUIRED, "dns.podSelector": {"app": "coredns"},
                                     "dns.namespaceSelector": {"name": "dns"}})
    assert docs["NetworkPolicy"]["spec"]["egress"][1]["to"] == [
        {"namespaceSelector": {"matchLabels": {"name": "dns"}},
         "podSelector": {"matchLabels": {"app": "coredns"}}}]
    for key in ("dns.namespaceSelector", "dns.podSelector"):
        with pytest.raises(HelmFail, match=key):
            _chart("medfed-site", {**SITE_REQUIRED, key: {}})


def test_site_chart_hands_the_daemon_an_owner_only_key():
    """Kubernetes adds group read to Secret files when fsGroup is set; ``medfed site`` refuses
    such a key, so the chart copies it owner-only (0600) into a memory volume first."""
    _, docs = _chart("medfed-site", SITE_REQUIRED)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container, args = _container_args(docs["Deployment"])
    key = _parse("site", args).auth_key
    mount = next(m for m in container["volumeMounts"] if key.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "secret" not in volume and volume["emptyDir"] == {"medium": "Memory"}
    copy = " ".join(" ".join(c["command"]) for c in pod["initContainers"])
    assert "install -m 0600" in copy and key in copy


def test_site_chart_requires_and_passes_the_approved_app_digest():
    defaults = yaml.safe_load((DEPLOY / "helm/medfed-site/values.yaml").read_text())
    assert not defaults["app"]["digest"]                   # the operator must approve one
    with pytest.raises(HelmFail, match="app.digest"):
        _chart("medfed-site", {"coordinator.cidr": COORDINATOR_CIDR})
    _, docs = _chart("medfed-site", SITE_REQUIRED)
    assert _parse("site", _container_args(docs["Deployment"])[1]).allow_app == [APP_DIGEST]


def test_site_chart_does_not_open_the_state_volume_to_its_group_on_restart():
    """With fsGroup, Kubernetes adds group rw to every file of a volume at each mount unless
    told to leave a volume it already owns alone; ``medfed site`` would then refuse its own
    ``runtime-auth.secret`` (owner-only, like the key) after a pod restart."""
    _, docs = _chart("medfed-site", SITE_REQUIRED)
    context = docs["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert "fsGroup" not in context or context["fsGroupChangePolicy"] == "OnRootMismatch"


# ---- least privilege: what the containers may do besides their job ----

CHARTS = [("medfed-site", "Deployment", SITE_REQUIRED, "site"),
          ("medfed-coordinator", "StatefulSet", {}, "server")]


def _volumes(pod: dict) -> dict[str, dict]:
    return {v["name"]: v for v in pod["volumes"]}


@pytest.mark.parametrize("chart,kind,overrides,command", CHARTS)
def test_charts_drop_privileges(chart, kind, overrides, command):
    """No service-account token, the runtime's default seccomp filter, and in every container
    (init containers too) no capability, no privilege escalation, a read-only root."""
    _, docs = _chart(chart, overrides)
    pod = docs[kind]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["initContainers"] + pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert "privileged" not in context and "runAsUser" not in context


@pytest.mark.parametrize("chart,kind,overrides,command", CHARTS)
def test_read_only_containers_write_to_their_volumes(chart, kind, overrides, command):
    """With a read-only root, every place a container writes is a writable volume: the
    daemon's state folders (from its real command line) and /tmp; an init container's
    targets are the memory/emptyDir volumes it fills."""
    _, docs = _chart(chart, overrides)
    pod = docs[kind]["spec"]["template"]["spec"]
    container, args = _container_args(docs[kind])
    parsed = _parse(command, args)
    writable = {m["mountPath"]: m for m in container["volumeMounts"] if not m.get("readOnly")}
    state = [parsed.state_dir] + ([parsed.privacy_dir] if command == "site" else [])
    for path in (*state, "/tmp"):
        assert _covered(path, writable), path
    tmp = writable["/tmp"]
    assert "emptyDir" in _volumes(pod)[tmp["name"]]
    for init in pod["initContainers"]:
        for mount in (m for m in init["volumeMounts"] if not m.get("readOnly")):
            assert "emptyDir" in _volumes(pod)[mount["name"]]
            assert mount["mountPath"] + "/" in " ".join(init["command"])


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_services_drop_privileges(name):
    """Every service: no capability (postgres keeps the few its root entrypoint needs to hand
    its data folder to the postgres user), no-new-privileges, a read-only root with /tmp in
    memory; writes go to its named volumes."""
    service = SERVICES[name]
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["read_only"] is True and "/tmp" in service["tmpfs"]
    assert "privileged" not in service
    if name == "postgres":
        assert set(service["cap_add"]) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"}
        assert "/var/run/postgresql" in service["tmpfs"]
    else:
        assert "cap_add" not in service
    command = [_interpolate(str(a)) for a in service.get("command", [])]
    if name == "coordinator":
        writes = [_parse("server", command).state_dir]
    elif name in SITES:
        parsed = _parse("site", command)
        writes = [parsed.state_dir, parsed.privacy_dir]
    elif name == "mlflow":
        writes = [command[command.index("--artifacts-destination") + 1]]
    else:
        writes = ["/var/lib/postgresql/data"]
    volumes = {target: spec for spec in service["volumes"]
               for target in [spec.split(":")[1]] if not spec.endswith(":ro")}
    assert all(_covered(path, volumes) for path in writes), (name, writes)
