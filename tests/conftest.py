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


# a fresh interpreter in which importing torch, vLLM or transformers raises, then analyze_sweep.main(argv)
_ANALYSIS_WITHOUT_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'vllm', 'transformers'):
            raise ImportError('analyze_sweep.py must not import ' + name)
sys.meta_path.insert(0, Block())
import analyze_sweep
sys.exit(analyze_sweep.main(sys.argv[1:]))
"""


def analyse_without_torch(*args: str):
    import subprocess

    return subprocess.run([sys.executable, "-c", _ANALYSIS_WITHOUT_TORCH, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def free_port() -> int:
    """A TCP port nobody listens on now (a vLLM server's, a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_report_header(config):
    """Free disk space where the suite writes: a CI run that dies of ENOSPC shows how little it started with."""
    import shutil
    import tempfile

    lines = []
    for label, path in (("repo", REPO), ("tmp", Path(tempfile.gettempdir()))):
        usage = shutil.disk_usage(path)
        lines.append(f"{label} {path}: {usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.0f} GiB")
    return "disk: " + "; ".join(lines) + " (the suite needs about 1 GB beside .venv)"


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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, default_model_dir):
    """tiny_model("gpt2" | "llama" | "mistral"): the folder of a tiny random model of that architecture with the real
    SmolLM2 tokenizer, written once per session."""
    from models import save_tiny_model

    made = {}

    def folder(arch: str) -> Path:
        if arch not in made:
            made[arch] = save_tiny_model(arch, tmp_path_factory.mktemp("models") / f"tiny-{arch}", str(default_model_dir))
        return made[arch]
    return folder
