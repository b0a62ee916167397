"""Shared fixtures: the repository root, running a demo or module as a user would, and the tiny CPU models.

Tests that run a demo or `python -m flux` end to end (as a script, or a demo's whole `main`) are marked `slow`.
`pytest -q` runs everything, as CI does; `pytest -m "not slow"` is the quick loop while editing.
"""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs of a demo or `python -m flux` (CI runs them too)")


# The files whose module fixtures take minutes (flux-mini's ablation; its sweep and text to image). They go first, so
# that under `--dist loadfile --no-loadscope-reorder` (pyproject) each starts on a worker at once while the other
# worker works through the rest, instead of starting last and running alone.
LONG_FILES = ("test_mini_ablation.py", "test_mini_method.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONG_FILES)  # stable: the order within each group is kept


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def run_script() -> Callable[..., subprocess.CompletedProcess]:
    """`run_script("demo_0_test.py", "configs/tiny/demo_0_test.json", "seed=1", env={...})`: a fresh Python process in
    the repository root, as the README runs it; returns the completed process with text stdout/stderr.

    `env` is laid over this process's environment (a None value unsets that variable); with `inherit_env=False` it
    is the whole environment."""

    def run(
        *args: str | Path,
        env: dict[str, str | None] | None = None,
        inherit_env: bool = True,
        cwd: Path = REPO,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess:
        merged = {**(os.environ if inherit_env else {}), **(env or {})}
        full_env = {k: v for k, v in merged.items() if v is not None}
        return subprocess.run(
            [sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
        )

    return run


@pytest.fixture(scope="session")
def tiny_models():
    """flux-tiny's four networks on the CPU in float32, loaded once per test session. Read-only: a test that changes
    weights, modules or hooks for good loads its own (or works on a copy)."""
    from flux.pipeline import load_models

    return load_models("flux-tiny", "cpu", torch.float32)


@pytest.fixture(scope="module")
def mini():
    """flux-mini's shipped weights on the CPU in float32 (read-only, as `tiny_models`)."""
    from flux.pipeline import load_models

    return load_models("flux-mini", "cpu", torch.float32)
