"""Shared fixtures: the real SmolLM2 tokenizer, the real HH file, tiny models. No network (HF_HUB_OFFLINE=1).

A skipped test is reported as a failure: a missing dependency must never pass quietly in CI.
"""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_TEST = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
sys.path.insert(0, str(REPO))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped tests count as failures in this project: {report.longrepr}"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from models import DEFAULT_MODEL_DIR, is_prepared

    assert is_prepared(DEFAULT_MODEL_DIR), "default model missing: run `make setup` (scripts/setup.sh) first"
    return DEFAULT_MODEL_DIR


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from models import load_tokenizer

    return load_tokenizer(str(default_model_dir))


@pytest.fixture(scope="session")
def hh_path() -> Path:
    assert HH_TEST.is_file(), f"{HH_TEST} missing: the repo expects ../shared beside it"
    return HH_TEST
