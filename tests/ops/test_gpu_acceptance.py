"""scripts/gpu_acceptance.py's pieces that decide pass/fail without a GPU: the wheelhouse
check, the loss criterion and the table format (the whole dry run is in .ci/run)."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_acceptance",
                                              Path(REPO) / "scripts" / "gpu_acceptance.py")
acceptance = importlib.util.module_from_spec(spec)
sys.modules["gpu_acceptance"] = acceptance  # its dataclasses look their module up
spec.loader.exec_module(acceptance)


@pytest.mark.parametrize("name,fits", [
    ("megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl", True),
    ("tokenizers-0.22.1-cp39-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", True),
    ("tqdm-4.67.1-py3-none-any.whl", True),
    ("megatron_core-0.16.1-cp311-cp311-manylinux_2_28_x86_64.whl", False),
    ("psutil-7.1.3-cp312-cp312-manylinux_2_28_aarch64.whl", False),
    ("psutil-7.1.3-cp312-cp312-macosx_11_0_arm64.whl", False),
])
def test_wheel_fits_the_gpu_machine(name, fits):
    assert acceptance.wheel_fits(name) is fits


def test_wheelhouse_plan_names_what_is_missing(tmp_path):
    with pytest.raises(acceptance.StageFailed, match="run scripts/gpu_wheelhouse.sh"):
        acceptance.wheelhouse_plan(tmp_path)
    (tmp_path / "REQUIREMENTS.txt").write_text("megatron-core==0.16.1\ntqdm==4.67.1\n")
    (tmp_path / "tqdm-4.67.1-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "megatron_core-0.16.1-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    with pytest.raises(acceptance.StageFailed, match="no cp312 manylinux wheel of megatron-core"):
        acceptance.wheelhouse_plan(tmp_path)
    good = "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    (tmp_path / good).write_bytes(b"")
    assert [(m, w.name) for m, w in acceptance.wheelhouse_plan(tmp_path)] == [
        ("megatron.core", good), ("tqdm", "tqdm-4.67.1-py3-none-any.whl")]


def test_losses_must_be_finite_and_falling():
    assert acceptance.losses_falling([10.6, 10.5, 10.4])
    assert not acceptance.losses_falling([10.4, 10.5])
    assert not acceptance.losses_falling([10.6, math.nan, 10.4])
    assert not acceptance.losses_falling([10.6, math.inf])
    assert not acceptance.losses_falling([])


def test_report_table_format():
    results = [acceptance.Result(name, ok, 1.5, f"detail of {name} | with a bar")
               for name, ok in zip(acceptance.STAGES, (True, True, False, None, True, True))]
    results[-1].sections = ["### extra", "", "| a | b |", "|---|---|", "| 1 | 2 |", ""]
    report = acceptance.render(results, "## header")
    assert acceptance.table_problems(report) == []
    assert "| tests | FAIL | 2 | detail of tests / with a bar |" in report
    assert "| permute_bench | skipped |" in report
    broken = report.replace("| 1 | 2 |", "| 1 | 2 | 3 |")
    assert acceptance.table_problems(broken) == [f"line {len(report.splitlines()) - 1}: 3 cells, "
                                                 "its table has 2"]
    assert "stages" in acceptance.table_problems(report.replace("| checkpoint |", "| other |"))[0]


def test_only_missing_modules_are_unpacked_onto_the_path(tmp_path, monkeypatch):
    house = tmp_path / "wheelhouse"
    house.mkdir()
    (house / "REQUIREMENTS.txt").write_text("megatron-core==0.16.1\ntqdm==4.67.1\n")
    for name, package in [("megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl",
                           "megatron/core/package_info.py"),
                          ("tqdm-4.67.1-py3-none-any.whl", "tqdm/__init__.py")]:
        with zipfile.ZipFile(house / name, "w") as wheel:
            wheel.writestr(package, "MAJOR = 0\n")
    monkeypatch.setattr(acceptance, "importable", lambda module: module == "tqdm")
    runner = acceptance.Runner(tmp_path / "out", budget=60, dry_run=False)
    site = tmp_path / "site"
    assert acceptance.install_missing_wheels(runner, house, site).endswith(": megatron_core")
    assert (site / "megatron" / "core" / "package_info.py").is_file()
    assert not (site / "tqdm").exists()
    assert runner.env["PYTHONPATH"].split(os.pathsep)[:2] == [str(site), REPO]
    dry = acceptance.Runner(tmp_path / "out", budget=60, dry_run=True)
    assert "wheelhouse ok (2 wheels" in acceptance.install_missing_wheels(dry, house, site)


def test_a_stage_past_its_limit_fails_with_its_partial_output_logged(tmp_path):
    runner = acceptance.Runner(tmp_path, budget=60, dry_run=True)
    runner.limit = 1
    code = "import time; print('started', flush=True); time.sleep(30)"
    with pytest.raises(acceptance.StageFailed, match="timed out after 1 s"):
        runner.run([sys.executable, "-c", code])
    assert "started" in (tmp_path / acceptance.LOG).read_text()
