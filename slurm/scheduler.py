"""Where a sweep's jobs stand: the job record (<sweep>/sweep.json), what Slurm (sacct, then squeue) or the local
machine says of each job, the lock that keeps two launchers from submitting the same runs, and --cancel.

A scheduler that does not answer is an error, never "not queued" (that would resubmit running jobs).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

from config import UserInputError

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def read_record(out: Path) -> dict:
    """The sweep's job record: {"jobs": {key: {job_id, executor, submitted}}, "submissions": [...]}."""
    path = out / "sweep.json"
    return json.loads(path.read_text()) if path.is_file() else {"jobs": {}, "submissions": []}


def write_record(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"sweep.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out / "sweep.json")


def _expand_array(job_id: str) -> list[str]:
    """sacct prints pending array tasks as 123_[0-3,5%2]: one id per task."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not m:
        return [job_id]
    ids = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        ids += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return ids


def _scheduler_query(cmd: list[str]) -> list[tuple[str, str]]:
    """(job id, state) pairs from sacct/squeue."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserInputError(f"`{' '.join(cmd[:1])}` failed ({e}); cannot tell which jobs are still queued") from None
    if result.returncode != 0:
        raise UserInputError(f"`{shlex.join(cmd)}` failed: {result.stderr.strip()[:300]}; cannot tell which jobs "
                             f"are still queued (is the cluster up? SLURM_CONF?)")
    pairs = [line.split("|", 1) for line in result.stdout.splitlines() if "|" in line]
    return [(job_id.strip(), (state.split() or ["UNKNOWN"])[0]) for job_id, state in pairs]


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """job id (123 or 123_4) -> Slurm state: sacct (the accounting database, finished jobs included), then squeue
    for jobs accounting has not heard of yet (it learns of a new job a moment after slurmctld does)."""
    if not job_ids:
        return {}
    base = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    states = {}
    if shutil.which("sacct"):
        rows = _scheduler_query(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", base])
        # a task's own row wins over the pending range that still names it (123_1 RUNNING beside 123_[1-2%3] PENDING)
        for job_id, state in sorted(rows, key=lambda row: "[" not in row[0]):
            states.update({one: state for one in _expand_array(job_id)})
    if any(j not in states for j in job_ids):
        if not shutil.which("squeue"):
            raise UserInputError("squeue not found: run --status/--cancel and re-submissions on the cluster's login node")
        # --states=all: slurmctld still lists jobs that ended in the last MinJobAge seconds
        for job_id, state in _scheduler_query(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T", "-j", base]):
            states.setdefault(job_id, state)
    for job_id in job_ids:  # an array cancelled before any task started is one sacct row under the array's id
        if job_id not in states and job_id.split("_")[0] in states:
            states[job_id] = states[job_id.split("_")[0]]
    return states


def local_alive(pid: str, folder: Path) -> bool:
    """A local-executor job is its submitit controller (`python -m submitit.local._local <folder>`): the PID must
    still be that process, for this sweep's folder (PIDs are reused)."""
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (OSError, ValueError):
        return False
    return "submitit.local._local" in cmdline and any(Path(a).resolve() == folder.resolve() for a in cmdline if a)


def scheduler_states(record: dict, out: Path) -> dict[str, str]:
    """job key -> scheduler state for every recorded job (Slurm's name, or RUNNING/EXITED for local jobs)."""
    slurm_ids = {k: r["job_id"] for k, r in record["jobs"].items() if r.get("executor") == "slurm"}
    by_id = slurm_states(list(slurm_ids.values()))
    states = {k: by_id.get(j, "UNKNOWN") for k, j in slurm_ids.items()}
    for k, r in record["jobs"].items():
        if r.get("executor") == "local":
            states[k] = "RUNNING" if local_alive(r["job_id"], out / "submitit") else "EXITED"
        elif r.get("executor") == "debug":
            states[k] = "EXITED"
    return states


@contextlib.contextmanager
def sweep_lock(out: Path, shared: bool = False):
    """Two launchers on one sweep at once would submit the same runs twice. A dry run only looks (and leaves no
    folder behind)."""
    if shared:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserInputError(f"another sweep.py is submitting {out} right now") from None
        yield


def cancel(record: dict, states: dict[str, str], say) -> int:
    """scancel the sweep's queued and running Slurm jobs; SIGINT its running local jobs (submitit's local controller
    stops its tasks on SIGINT, and training checkpoints at its next step boundary)."""
    slurm_ids = [r["job_id"] for k, r in record["jobs"].items()
                 if r.get("executor") == "slurm" and states.get(k) in ACTIVE_STATES]
    if slurm_ids:
        subprocess.run(["scancel", *slurm_ids], check=False)
        say(f"cancelled Slurm job(s) {', '.join(slurm_ids)}")
    local = [r["job_id"] for k, r in record["jobs"].items() if r.get("executor") == "local" and states.get(k) == "RUNNING"]
    for pid in local:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGINT)
    if local:
        say(f"interrupted local job(s) {', '.join(local)}")
    if not slurm_ids and not local:
        say("nothing queued or running")
    return len(slurm_ids) + len(local)
