"""Every shipped Triton configuration compiles for sm_80 and sm_90 without spills.

Runs ``benchmarks/aot_compile.py`` (Triton's real compiler, no GPU needed) in a
subprocess without ``TRITON_INTERPRET``; results are cached in ``benchmarks/results/aot_cache.json`` so
only changed kernels recompile.  Marked ``aot`` (a cold run compiles hundreds of
configurations: minutes).
"""

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.aot


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot_compile.py"), "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_kernel_module_ships_configs(report):
    import semask_fast.kernels as pkg

    modules = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    assert modules and report["modules"] == modules
    for module in modules:
        archs = {r["arch"] for r in report["rows"] if r["module"] == module}
        assert archs == {80, 90}, f"{module}: compiled for {sorted(archs)}"


def test_no_spills(report):
    spills = sorted(f"{r['config']} sm_{r['arch']}: {r['spill_bytes']} B" for r in report["rows"] if r["spill_bytes"])
    assert not spills, f"configurations that spill registers: {spills}"


def test_shared_memory_fits(report):
    over = [f"{r['config']} sm_{r['arch']}: {r['smem']} > {r['smem_limit']}" for r in report["rows"]
            if r["smem"] > r["smem_limit"]]
    assert not over, over
    assert all(r["registers"] <= 255 for r in report["rows"])
