"""Shared test fixtures: where ../shared is, and how tests that need it behave without it.

``../shared`` (corpus, oracle) sits beside the repository for developers and CI, not for users. Tests that
need it skip with a stated reason when it is absent; ``RESNETC_REQUIRE_SHARED=1`` (set by .ci/run) turns
that skip into a failure.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
CORPUS = os.path.join(SHARED, "corpus")
ORACLE = os.path.join(SHARED, "oracle")


def shared_available() -> bool:
    return os.path.isdir(CORPUS) and os.path.isdir(ORACLE)


def require_shared() -> None:
    """Skip (or fail under RESNETC_REQUIRE_SHARED=1) when ../shared is absent."""
    if shared_available():
        return
    msg = f"../shared (corpus and Caffe oracle) not found at {SHARED}: it sits beside the repo for developers and CI"
    if os.environ.get("RESNETC_REQUIRE_SHARED") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def corpus_manifest() -> list:
    """Rows of corpus/MANIFEST.tsv (empty list when ../shared is absent)."""
    path = os.path.join(CORPUS, "MANIFEST.tsv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture
def shared():
    require_shared()
    return SHARED


@pytest.fixture
def corpus():
    require_shared()
    return CORPUS


@pytest.fixture
def oracle():
    require_shared()
    return ORACLE


def resnetc_cmd() -> list:
    """The console script installed beside this interpreter (as a user runs it); else `python -m resnetc`.

    A ``resnetc`` elsewhere on PATH may belong to another environment, so it is not used."""
    exe = os.path.join(os.path.dirname(sys.executable), "resnetc")
    if os.path.exists(exe):
        return [exe]
    return [sys.executable, "-m", "resnetc"]


@pytest.fixture
def run_cli():
    """Run the resnetc CLI in a subprocess; returns CompletedProcess (text)."""

    def run(*args, cwd=None, timeout=300, env=None):
        e = dict(os.environ)
        e.update(env or {})
        return subprocess.run(resnetc_cmd() + [str(a) for a in args], capture_output=True, text=True,
                              cwd=cwd, timeout=timeout, env=e)

    return run
