"""Nothing started outlives the command that started it, and two launchers never run one sweep twice.

Real processes throughout: the launchers and scripts are started as commands, signalled the way a closed terminal
(SIGHUP), `timeout` or a scheduler (SIGTERM) and Ctrl-C (SIGINT) do, and every process below them is counted
before and after. vLLM's engine core is the case that used to be left running at 100% of a core.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, SWEEP
from jsonl import read_jsonl

PY = sys.executable


def as_from_a_terminal() -> None:
    """SIGINT and SIGHUP as a command typed in a terminal gets them: CI may run the suite in the background (a
    non-interactive shell's `&` ignores SIGINT, `nohup` SIGHUP), and an ignored signal is inherited (and, rightly,
    stays ignored: the commands keep nohup's choice)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start(*argv, **kw) -> subprocess.Popen:
    """A command in a session of its own (the test cleans up after it whatever happens), output to a file."""
    log = kw.pop("log")
    with open(log, "w") as fh:
        return subprocess.Popen([PY, *map(str, argv)], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=as_from_a_terminal,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **kw.pop("env", {})})


def tree(proc) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_for_descendant(proc, needle: str, timeout_s: float = 240, log: Path | None = None) -> list[psutil.Process]:
    """Poll until a process below `proc` has `needle` in its command line; the whole tree then."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, f"ended before {needle} started: " + (log.read_text()[-3000:] if log else "")
        procs = tree(proc)
        for p in procs:
            try:
                if needle in " ".join(p.cmdline()[:2]):  # the program, not an argument
                    time.sleep(1)  # let it get going
                    return tree(proc)
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.3)
    pytest.fail(f"no {needle} below {proc.args} after {timeout_s} s")


def alive(processes) -> list[str]:
    """The ones still running (same PID and start time: PIDs are reused), as 'pid cmdline'."""
    left = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:150]}")
        except psutil.NoSuchProcess:
            pass
    return left


def stop(proc, sig, timeout_s: float = 120) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def cleanup(processes) -> None:
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def pipeline_args(root: Path, *extra):
    return ["pipeline.py", "--config", SWEEP, f"root={root}", f"report={root}/report", "--executor", "local",
            "--progress-s", "1", *extra]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_to_pipeline_stops_its_local_jobs(tmp_path, sig):
    """The pipeline's local job (submitit controller, job process, accelerate launcher, trainer in a session of its
    own) ends with the pipeline, whichever signal stops it; a re-run goes on from what is on disk."""
    log = tmp_path / "pipeline.log"
    proc = start(*pipeline_args(tmp_path), log=log)
    before = wait_for_descendant(proc, "train_dpo.py", log=log)
    assert len(before) >= 4, [p.cmdline() for p in before]  # controller, job, launcher, trainer
    try:
        code = stop(proc, sig)
        left = alive(before)
        assert not left, f"outlived pipeline.py after {sig.name}: {left}"
    finally:
        cleanup(before)
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert f"interrupted ({sig.name})" in text and "Traceback" not in text, text[-3000:]
    if sig == signal.SIGTERM:  # what was written is kept: the SFT stage alone finishes from it
        again = subprocess.run([PY, *pipeline_args(tmp_path, "--stage", "sft")], cwd=REPO, capture_output=True,
                               text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        steps = [r["step"] for r in read_jsonl(tmp_path / "sweep_tiny" / "sft" / "metrics.jsonl")
                 if r.get("split") == "train"]
        assert sorted(steps) == sorted(set(steps)) and max(steps) == 4, steps


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_launchers_never_run_one_sweep_twice(tmp_path):
    """A second pipeline.py or slurm/sweep.py on a sweep that a first one is running refuses with one line naming
    the first. A SIGKILL of the first (which no process can handle) leaves its local job running, as on Slurm: a new
    launcher starts nothing beside it and waits; `--cancel` stops the job's whole tree (the trainer checkpoints);
    the waiting launcher then resumes the run and finishes it, and every step was trained once."""
    longer = "sft.overrides.train.max_steps=200"  # long enough to be running through all of this
    log = tmp_path / "first.log"
    first = start(*pipeline_args(tmp_path, longer), log=log)
    running = wait_for_descendant(first, "train_dpo.py", log=log)
    waiting = None
    try:
        for second in (pipeline_args(tmp_path, longer), ["slurm/sweep.py", "--config", SWEEP, f"root={tmp_path}",
                                                         "--executor", "local", longer]):
            result = subprocess.run([PY, *second], cwd=REPO, capture_output=True, text=True, timeout=300)
            assert result.returncode == 2, result.stdout + result.stderr
            line = result.stderr.strip().splitlines()[-1]
            assert line.startswith(f"error: {tmp_path}/sweep_tiny/.lock: pid {first.pid} (") and \
                "is running this sweep right now" in line, line
            assert "Traceback" not in result.stderr
        status = subprocess.run([PY, *pipeline_args(tmp_path, longer, "--status")], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        assert status.returncode == 0 and "sft" in status.stdout, "--status only looks: it needs no lock"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert len(alive(running)) == len(running), "a SIGKILLed launcher's local job runs on (as on Slurm)"
        waiting = start(*pipeline_args(tmp_path, longer, "--stage", "sft"), log=tmp_path / "waiting.log")
        deadline = time.time() + 120
        while "waiting for sft (local job" not in (tmp_path / "waiting.log").read_text() and time.time() < deadline:
            assert waiting.poll() is None, (tmp_path / "waiting.log").read_text()
            time.sleep(0.5)
        assert len(alive(running)) == len(running) and not [p for p in tree(waiting)
                                                            if "train_dpo.py" in " ".join(p.cmdline()[:2])], \
            "the second launcher started nothing beside the running job"
        cancel = subprocess.run([PY, "slurm/sweep.py", "--config", SWEEP, f"root={tmp_path}", longer, "--cancel"],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert cancel.returncode == 0 and "stopped local job(s)" in cancel.stdout, cancel.stdout + cancel.stderr
        assert not alive(running), f"--cancel left {alive(running)}"
        assert waiting.wait(timeout=600) == 0, (tmp_path / "waiting.log").read_text()[-3000:]
    finally:
        cleanup(running)
        if waiting is not None and waiting.poll() is None:
            os.killpg(waiting.pid, signal.SIGKILL)
    text = (tmp_path / "waiting.log").read_text()
    assert "resumed_from" in (tmp_path / "sweep_tiny" / "sft" / "run.json").read_text()
    steps = [r["step"] for r in read_jsonl(tmp_path / "sweep_tiny" / "sft" / "metrics.jsonl") if r.get("split") == "train"]
    assert sorted(steps) == sorted(set(steps)) and max(steps) == 200, f"a step trained twice or missing: {steps}"
    assert "started sft (local job" in text, text[-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sweep_py_local_executor_stops_its_jobs_on_sighup(tmp_path):
    log = tmp_path / "sweep.log"
    proc = start("slurm/sweep.py", "--config", SWEEP, f"root={tmp_path}", "--executor", "local", log=log)
    before = wait_for_descendant(proc, "train_dpo.py", log=log)
    try:
        code = stop(proc, signal.SIGHUP)
        assert not alive(before), alive(before)
    finally:
        cleanup(before)
    assert code == 130 and "interrupted (SIGHUP)" in log.read_text(), log.read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_signal_to_train_dpo_checkpoints_and_stops(tmp_path):
    """train_dpo.py alone: SIGHUP (and SIGTERM, SIGINT: the same handler) saves a checkpoint at the next step boundary
    and exits; run.json says interrupted."""
    out = tmp_path / "run"
    log = tmp_path / "train.log"
    proc = start("train_dpo.py", "--config", "configs/tiny.yaml", f"output_dir={out}", "train.max_steps=100000",
                 "loss.name=sft", log=log)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.3)
    code = stop(proc, signal.SIGHUP)
    assert code == 143, log.read_text()[-3000:]

    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["last_checkpoint"], info
    assert Path(info["last_checkpoint"]).is_dir()


def vllm_generate(tmp_path, model) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "generate.log"
    proc = start("generate.py", "--model", model, "--prompts", "alpaca_eval", "--limit", "200", "--out",
                 tmp_path / "answers.jsonl", "--engine", "vllm", "--max-new-tokens", "64", "--batch-size", "8",
                 log=log, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    return proc, log


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.multiprocess
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_vllm_engine_core_ends_with_generate(tmp_path, default_model_dir, sig):
    """SIGTERM: generate.py shuts the engine down and keeps its answers; SIGKILL (no handler can run): the engine
    core was told by the kernel to die with its parent (PR_SET_PDEATHSIG)."""
    proc, log = vllm_generate(tmp_path, default_model_dir)
    out = tmp_path / "answers.jsonl"
    before = wait_for_descendant(proc, "EngineCore", timeout_s=300, log=log)
    before = [p for p in before]  # the engine core and whatever it started
    deadline = time.time() + 300
    while time.time() < deadline and len(read_jsonl(out)) < 8:  # answering: rows on disk
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.3)
    try:
        code = stop(proc, sig, timeout_s=60)
        deadline = time.time() + 30
        while alive(before) and time.time() < deadline:
            time.sleep(0.3)
        assert not alive(before), f"outlived generate.py after {sig.name}: {alive(before)}"
    finally:
        cleanup(before)
    rows = read_jsonl(out)
    assert rows and len({r["key"] for r in rows}) == len(rows)
    if sig == signal.SIGTERM:
        assert code == 130 and "interrupted (SIGTERM)" in log.read_text(), log.read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kill_anywhere_short_soak(tmp_path):
    """scripts/soak.py's short version: training, generation and judging SIGKILLed twice each at seeded moments in
    the middle of their work, re-run to the end, and compared with an uninterrupted run: identical metrics and
    parameter checksum, the same rows (none twice, none missing, same text), no half-written marker."""

    table = tmp_path / "soak.json"
    result = subprocess.run([PY, "scripts/soak.py", "--stages", "train-dpo", "generate-hf", "judge", "--kills", "2",
                             "--work", tmp_path / "work", "--json", table], cwd=REPO, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["stage"]: r for r in json.loads(table.read_text())}
    assert set(rows) == {"train-dpo", "generate-hf", "judge"}
    for stage, r in rows.items():
        assert r["kills"] == 2 and r["runs"] == 3 and r["identical"] and r["torn"] == 0, r
        assert r["compared"] >= 20, r
    assert "| train-dpo | 2 | 3 |" in result.stdout, result.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ctrl_c_to_judge_keeps_its_verdicts(tmp_path, default_model_dir):
    """judge.py (HF engine) on SIGINT: exit 130 with one line, every verdict written stays, once each; a re-run
    judges only the rest."""
    rows = [{"key": f"{m}|{i}", "prompt_id": str(i), "sample_index": 0, "prompt": f"Question {i}?",
             "messages": [{"role": "user", "content": f"Question {i}?"}], "response": f"{m} answer {i}.",
             "model": m, "model_name": m, "sampling_hash": m, "finish_reason": "stop", "new_tokens": 3}
            for m in ("dpo", "sft") for i in range(40)]
    for m in ("dpo", "sft"):
        (tmp_path / f"{m}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows
                                                     if r["model"] == m))
    out, log = tmp_path / "verdicts.jsonl", tmp_path / "judge.log"
    argv = ["judge.py", "--candidate", tmp_path / "dpo.jsonl", "--baseline", tmp_path / "sft.jsonl", "--judge-model",
            default_model_dir, "--engine", "hf", "--batch-size", "1", "--out", out]
    proc = start(*argv, log=log)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_jsonl(out)) < 4:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    assert stop(proc, signal.SIGINT) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "interrupted (SIGINT); the verdicts written are in" in text and "Traceback" not in text, text[-3000:]
    kept = read_jsonl(out)
    assert 4 <= len(kept) < 40 and len({r["key"] for r in kept}) == len(kept)
    again = subprocess.run([PY, *map(str, argv)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = read_jsonl(out)
    assert len(rows) == 40 and len({r["key"] for r in rows}) == 40 and rows[:len(kept)] == kept
