"""Every benchmark script starts and runs its `--tiny` mode (flux-tiny on the CPU) as docs/performance.md writes
the command: an import or API break fails here instead of on the GPU machine."""

import json
from pathlib import Path

import pytest

SCRIPTS = sorted(p.name for p in (Path(__file__).parent.parent / "benchmarks").glob("*.py") if p.name != "common.py")


def test_every_benchmark_is_covered():
    assert {
        "bench_transformer.py",
        "bench_sweep.py",
        "bench_demo_memory.py",
        "bench_e2e.py",
        "bench_methods.py",
    } <= set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_tiny(tmp_path, run_script, script):
    r = run_script(f"benchmarks/{script}", "--tiny", "--out", tmp_path, env={"HF_HUB_OFFLINE": "1"}, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    written = list(tmp_path.rglob("*.json"))
    assert written, f"{script} --tiny wrote no results: {r.stdout[-1000:]}"
    for path in written:
        json.loads(path.read_text())  # whole, parseable results


@pytest.mark.slow
def test_bench_methods_counts_each_methods_evaluations(tmp_path, run_script):
    """Every demo_5 method is timed, with the NFE its published schedule implies (per sample): Stable Flow 50
    inversion steps + 50 steps of [reference, edit]; SDEdit the last round(0.6 * 28) steps; FlowEdit 24 steps of a
    source and a target velocity; RF-Solver-Edit 15 steps of two evaluations, inverted and then denoised with a
    reference; FireFlow 8 steps of one evaluation plus its first, likewise."""
    r = run_script("benchmarks/bench_methods.py", "--tiny", "--out", tmp_path, env={"HF_HUB_OFFLINE": "1"}, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    methods = json.loads((tmp_path / "methods.json").read_text())["methods"]
    config = json.loads((Path(__file__).parent.parent / "configs" / "demo_5_bench.json").read_text())
    assert list(methods) == config["methods"]
    nfe = {"stable-flow": 150, "sdedit": 17, "flowedit": 48, "rf-solver-edit": 30 + 2 * 30, "fireflow": 9 + 2 * 9}
    assert {m: methods[m]["nfe"] for m in nfe} == nfe
    assert all(methods[m]["nfe"] == 150 for m in config["methods"] if m.startswith("stable-flow/"))
    assert all(r["s_per_edit"] > 0 for r in methods.values())
    assert "| stable-flow | " in r.stdout  # the markdown table for docs/performance.md
