"""Tests for benchmarks/run_all.py, the `make bench` driver, on made-up benchmarks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location(
        "run_all", ROOT / "benchmarks" / "run_all.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_all_collects_json_labels_it_and_reports_a_crash(run_all, tmp_path, capsys):
    benches, results = tmp_path / "benches", tmp_path / "results"
    benches.mkdir()
    (benches / "bench_good.py").write_text(
        "import json, sys\n"
        "path = sys.argv[sys.argv.index('--json') + 1]\n"
        "open(path, 'w').write(json.dumps({'results': {'tokens_per_s': 123.5}}))\n"
    )
    (benches / "bench_stdout.py").write_text(
        "print('noise')\nprint('{\"speed\": 7}')\n"
    )
    (benches / "bench_crash.py").write_text("raise SystemExit('broken on purpose')\n")

    code = run_all.main(["--dir", str(benches), "--results", str(results)])

    out = capsys.readouterr().out
    written = sorted(p.name.split(".")[0] for p in results.glob("*.json"))
    assert code == 1
    assert written == ["bench_good", "bench_stdout"]
    good = json.loads(next(results.glob("bench_good.*.json")).read_text())
    assert good["results"] == {"tokens_per_s": 123.5}
    assert good["benchmark"] == "good" and good["date"].endswith("Z")
    assert good["hardware"]["cpu_cores"] >= 1 and "label" in good["hardware"]
    assert (
        json.loads(next(results.glob("bench_stdout.*.json")).read_text())["speed"] == 7
    )
    assert "crash" in out and "FAILED: exit code 1: broken on purpose" in out
    assert "2 of 3 benchmarks succeeded" in out


def test_slug_makes_hardware_labels_safe_file_names(run_all):
    assert run_all.slug("1x NVIDIA H100 80GB HBM3") == "1x-nvidia-h100-80gb-hbm3"
    assert run_all.slug("CPU (AMD EPYC)") == "cpu-amd-epyc"
