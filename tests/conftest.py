"""Shared fixtures and helpers: the real SmolLM2 tokenizer, the real HH file, tiny models, running a script's
main(argv) in this process. No network (HF_HUB_OFFLINE=1).

A skipped test is reported as a failure: a missing dependency must never pass quietly in CI.
Tiers (pytest.ini): `make test-fast` deselects the markers slow, cluster, vllm and multiprocess; `make test` runs all.
"""
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two of these processes on two cores: one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # (torch reads it when first imported; four threads on two cores thrash)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_TEST = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


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
    return subprocess.run([sys.executable, "-c", _ANALYSIS_WITHOUT_TORCH, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def run_main(main, *args) -> subprocess.CompletedProcess:
    """`main(argv)` of one of the project's scripts, in this process, from the repo root, with its exit code and
    output captured as a subprocess's would be: a fresh interpreter costs 3-5 s of imports a call, and only a kill,
    a signal or one model per process (vLLM) needs one."""
    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_script(script: str, *args, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """A script in a process of its own (vLLM: one model per process), from the repo root."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def ok(result: subprocess.CompletedProcess) -> str:
    """A run that must succeed: its stderr (where the scripts log), or the tail of its output as the failure."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stderr


def free_port() -> int:
    """A TCP port nobody listens on now (a vLLM server's, a process group's rendezvous)."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_report_header(config):
    """Free disk space where the suite writes: a CI run that dies of ENOSPC shows how little it started with."""
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


# ---------------------------------------------------------------- the local Slurm cluster and the session's sweep

SWEEP = "configs/sweep_tiny.yaml"
CLUSTER = ["bash", str(REPO / "slurm" / "local_cluster.sh")]


@pytest.fixture(scope="session")
def cluster():
    """The local Slurm cluster (slurm/local_cluster.sh): `make test` starts it before pytest; run alone, this starts
    it and stops it again at the end (only if it started it). SLURM_CONF points at it meanwhile."""
    started = subprocess.run([*CLUSTER, "status"], capture_output=True).returncode != 0
    if started:
        up = subprocess.run([*CLUSTER, "up"], capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
    conf = subprocess.run([*CLUSTER, "env"], capture_output=True, text=True).stdout.split("=", 1)[1].strip()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if started:
        subprocess.run([*CLUSTER, "down"], capture_output=True, timeout=300)


def record(root: Path, name: str) -> dict:
    return json.loads((root / name / "sweep.json").read_text())


def wait_for_jobs(root: Path, name: str, timeout_s: float = 420) -> dict[str, str]:
    """Poll sacct until none of the sweep's jobs is pending or running; returns key -> final state."""
    from slurm import scheduler

    deadline = time.time() + timeout_s
    while True:
        states = scheduler.scheduler_states(record(root, name), root / name)
        if not any(s in scheduler.ACTIVE_STATES for s in states.values()):
            return states
        if time.time() > deadline:
            logs = "\n".join(p.read_text()[-1500:] for p in sorted((root / name / "submitit").glob("*_log.err")))
            pytest.fail(f"jobs still active after {timeout_s} s: {states}\n{logs}")
        time.sleep(2)


def sacct(*job_ids: str, duplicates: bool = False) -> list[list[str]]:
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)]
    out = subprocess.run(cmd + (["--duplicates"] if duplicates else []), capture_output=True, text=True, check=True)
    return [line.split("|") for line in out.stdout.splitlines() if line]


@pytest.fixture(scope="session")
def slurm_sweep(cluster, tmp_path_factory):
    """The session's one tiny sweep on Slurm: the whole loop (SFT, reference, 2 betas x 1 seed, answers, judging,
    report) submitted to the local cluster by pipeline.py, which follows the jobs to the end: training, then the
    generation array waiting on it, judging waiting on that, and the analysis job waiting on everything. The sweep,
    pipeline and analysis tests on Slurm read it; (root, pipeline output, final job states)."""
    import pipeline

    root = tmp_path_factory.mktemp("slurm")
    result = run_main(pipeline.main, "--config", SWEEP, f"root={root}", f"report={root}/report", "--progress-s", "2")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    states = wait_for_jobs(root, "sweep_tiny")
    yield root, result.stdout, states
    shutil.rmtree(root, ignore_errors=True)
