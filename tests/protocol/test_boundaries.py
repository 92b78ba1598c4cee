"""The site process imports no server code: protocol/ is what both sides share."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_site_app_imports_no_server_side_package():
    code = ("import sys, client.app; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'server', 'strategies', 'medfed'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_site_or_shared_module_imports_flower_serverapp():
    """``flwr/__init__.py`` itself imports ``flwr.server`` (and so ``flwr.serverapp``) in
    Flower 1.41, so ``sys.modules`` cannot show this; our own code must never ask for it."""
    offenders = [str(p.relative_to(ROOT)) for pkg in ("client", "protocol", "models")
                 for p in (ROOT / pkg).rglob("*.py")
                 if any(m == "flwr.serverapp" or m.startswith(("flwr.serverapp.", "flwr.server."))
                        or m == "flwr.server" or m.startswith(("server.", "strategies"))
                        or m == "server" for m in _imports(p))]
    assert offenders == []
