"""Bad input at the command line: one clear error line, a non-zero exit, nothing written."""

import json
import shutil

import pytest

from medfed.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ingest_reports_counts(tiny_sites, capsys):
    code, out, _ = _run(capsys, "ingest", "--data-dir", str(tiny_sites / "site-1"))
    assert code == 0
    assert "skipped files:" in out and "non_image=1" in out and "not_dicom=1" in out


def test_ingest_counts_findings_for_multi_label_sites(tiny_sites, capsys):
    names = "contrast_enhancement,necrosis,oedema"
    code, out, _ = _run(capsys, "ingest", "--data-dir", str(tiny_sites / "site-0"),
                        "--findings", names)
    assert code == 0
    line = next(l for l in out.splitlines() if l.startswith("findings: "))
    counts = dict(kv.split("=") for kv in line.removeprefix("findings: ").split(", "))
    assert set(counts) <= set(names.split(",")) | {"no_finding", "unlabelled"}
    assert int(counts.get("oedema", 0)) > 0 and "unknown_label" not in counts
    # a vocabulary lacking a finding the site has: those rows are counted, not guessed
    code, out, _ = _run(capsys, "ingest", "--data-dir", str(tiny_sites / "site-0"),
                        "--findings", "necrosis,oedema", "--json")
    assert code == 0 and json.loads(out)["labels"]["unknown_label"] > 0


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("empty", "empty"),
    ("corrupt", "no usable studies"),
])
def test_ingest_bad_sites_fail_with_one_line(tmp_path, capsys, setup, message):
    site = tmp_path / "site"
    if setup != "missing":
        (site / "dicom").mkdir(parents=True)
    if setup == "corrupt":
        (site / "dicom" / "x.dcm").write_bytes(b"DICM" * 10)
    code, _, err = _run(capsys, "ingest", "--data-dir", str(site))
    assert code == 2
    assert err.count("\n") == 1 and message in err and err.startswith("medfed: error:")


@pytest.mark.parametrize("overrides, message", [
    (["train.nope=1"], "train.nope"),
    (["strategy=nope"], "strategy/nope"),
    (["federation.num_sites=5"], "site-2"),
])
def test_simulate_bad_config_writes_nothing(tiny_sites, tmp_path, capsys, overrides, message):
    runs = tmp_path / "runs"
    code, _, err = _run(capsys, "simulate", f"data.root={tiny_sites}", f"runs_dir={runs}",
                        "strategy.min_available_sites=2", *overrides)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not runs.exists()


def test_simulate_missing_data_dir(tmp_path, capsys):
    code, _, err = _run(capsys, "simulate", f"data.root={tmp_path / 'none'}",
                        f"runs_dir={tmp_path / 'runs'}")
    assert code == 2 and "does not exist" in err and "medfed synth" in err
    assert not (tmp_path / "runs").exists()


def test_synth_refuses_to_overwrite(tiny_sites, tmp_path, capsys):
    target = tmp_path / "copy"
    shutil.copytree(tiny_sites, target)
    code, _, err = _run(capsys, "synth", "--sites", "1", "--out", str(target))
    assert code == 2 and "not empty" in err


@pytest.mark.parametrize("module, name", [
    ("server.config", "ConfigError"), ("client.data.site", "SiteDataError"),
    ("medfed.deploy.preflight", "DeployError"), ("medfed.export", "ExportError"),
    ("medfed.certs", "ProvisioningError"), ("medfed.predict", "PredictError"),
    ("protocol.serving", "ServingSpecError"),
])
def test_user_errors_are_recognised_without_importing_their_modules(module, name):
    # the dispatcher catches USER_ERRORS (exit 2) so that `medfed --help` need not import these
    import importlib

    from medfed.cli import USER_ERRORS

    assert issubclass(getattr(importlib.import_module(module), name), USER_ERRORS)
