"""Every benchmark script starts and runs its `--tiny` mode (flux-tiny on the CPU) as docs/performance.md writes
the command: an import or API break fails here instead of on the GPU machine."""

import json
from pathlib import Path

import pytest

SCRIPTS = sorted(p.name for p in (Path(__file__).parent.parent / "benchmarks").glob("*.py") if p.name != "common.py")


def test_every_benchmark_is_covered():
    assert {"bench_transformer.py", "bench_sweep.py", "bench_demo_memory.py", "bench_e2e.py"} <= set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_tiny(tmp_path, run_script, script):
    r = run_script(f"benchmarks/{script}", "--tiny", "--out", tmp_path, env={"HF_HUB_OFFLINE": "1"}, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    written = list(tmp_path.rglob("*.json"))
    assert written, f"{script} --tiny wrote no results: {r.stdout[-1000:]}"
    for path in written:
        json.loads(path.read_text())  # whole, parseable results
