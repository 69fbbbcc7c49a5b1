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
import subprocess
from pathlib import Path

import psutil

import procs
from config import UserInputError
from jsonl import write_atomic

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
    write_atomic(out / "sweep.json", json.dumps(record, indent=1))


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


def _seconds(text: str) -> float:
    """sacct's durations: MM:SS.mmm, HH:MM:SS or D-HH:MM:SS."""
    days, _, rest = text.rpartition("-")
    total = 0.0
    for part in rest.split(":"):
        total = total * 60 + float(part or 0)
    return total + 86400 * int(days or 0)


def _gigabytes(text: str) -> float:
    """sacct's sizes: 123456K, 512M, 1.5G (bare numbers are bytes)."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = text.strip()
    if not text:
        return 0.0
    return float(text[:-1]) * scale[text[-1]] / 2**30 if text[-1] in scale else float(text) / 2**30


def _tres(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def slurm_costs(job_ids: list[str]) -> dict[str, dict]:
    """job id -> {"records": one per run of the job (a requeue adds one), each {elapsed_s, cpu_s, max_rss_gb, cpus,
    gpus, state}} from Slurm's accounting: the allocation's Elapsed and AllocTRES, the CPU time and the largest
    MaxRSS of its steps. Jobs accounting does not know (yet) are left out; no sacct: {}."""
    if not job_ids or not shutil.which("sacct"):
        return {}
    base = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    cmd = ["sacct", "-n", "-P", "--duplicates", "-o", "JobID,State,ElapsedRaw,TotalCPU,MaxRSS,AllocTRES", "-j", base]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    wanted, found, current = set(job_ids), {}, {}
    for line in result.stdout.splitlines():
        fields = line.split("|")
        if len(fields) != 6:
            continue
        job_id, state, elapsed, cpu, rss, tres = fields
        owner, dot, _ = job_id.partition(".")
        if owner not in wanted:
            continue
        if not dot:  # the allocation: a new run of this job (its steps follow it)
            allocated = _tres(tres)
            current[owner] = {"state": (state.split() or ["UNKNOWN"])[0], "elapsed_s": float(elapsed or 0),
                              "cpu_s": _seconds(cpu) if cpu else 0.0, "max_rss_gb": 0.0,
                              "cpus": int(allocated.get("cpu", 0) or 0),
                              "gpus": sum(int(v) for k, v in allocated.items() if k.startswith("gres/gpu") and
                                          ":" not in k and v.isdigit())}
            found.setdefault(owner, {"records": []})["records"].append(current[owner])
        elif owner in current:
            current[owner]["max_rss_gb"] = max(current[owner]["max_rss_gb"], round(_gigabytes(rss), 3))
    return found


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


def record_costs(record: dict, states: dict[str, str]) -> bool:
    """Store Slurm's accounting of every recorded Slurm job that has ended (and has none stored yet) in the sweep
    record, jobs.<key>.sacct; True when something was added (the caller writes the record, under the sweep lock)."""
    ended = {k: r["job_id"] for k, r in record["jobs"].items() if r.get("executor") == "slurm" and "sacct" not in r
             and states.get(k, "UNKNOWN") not in ACTIVE_STATES | {"UNKNOWN"}}
    costs = slurm_costs(list(ended.values()))
    for key, job_id in ended.items():
        if job_id in costs:
            record["jobs"][key]["sacct"] = {**costs[job_id], "read": now()}
    return any(job_id in costs for job_id in ended.values())


_HELD: dict[str, int] = {}  # sweep folders this process holds the lock of (a launch inside a pipeline run)


@contextlib.contextmanager
def sweep_lock(out: Path, shared: bool = False):
    """Two launchers on one sweep at once would submit the same runs twice: the second refuses, naming the first
    (its PID and command line, written into the lock file). Re-entrant within one process. A dry run only looks
    (and leaves no folder behind)."""
    key = str(Path(out).resolve())
    if shared or _HELD.get(key):
        _HELD[key] = _HELD.get(key, 0) + (0 if shared else 1)
        try:
            yield
        finally:
            if not shared:
                _HELD[key] -= 1
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another launcher"
            raise UserInputError(f"{out}/.lock: {holder} is running this sweep right now; wait for it to end, or stop "
                                 f"it (Ctrl-C or kill -TERM stops its local jobs too). --status shows where it stands")\
                from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} ({shlex.join(psutil.Process().cmdline())[:200]}, since {now()})\n")
        fh.flush()
        _HELD[key] = 1
        try:
            yield
        finally:
            _HELD.pop(key, None)


def cancel(record: dict, states: dict[str, str], say, grace_s: float = 60.0) -> int:
    """scancel the sweep's queued and running Slurm jobs; stop its running local jobs, whichever launcher started
    them (one killed with SIGKILL leaves its jobs running): SIGTERM to each job's whole process tree (training
    checkpoints at its next step boundary), SIGKILL to what is left after grace_s."""
    slurm_ids = [r["job_id"] for k, r in record["jobs"].items()
                 if r.get("executor") == "slurm" and states.get(k) in ACTIVE_STATES]
    if slurm_ids:
        subprocess.run(["scancel", *slurm_ids], check=False)
        say(f"cancelled Slurm job(s) {', '.join(slurm_ids)}")
    local = [r["job_id"] for k, r in record["jobs"].items() if r.get("executor") == "local" and states.get(k) == "RUNNING"]
    stopped = 0
    for pid in local:
        with contextlib.suppress(psutil.NoSuchProcess, ValueError):
            stopped += procs.stop_tree(psutil.Process(int(pid)), grace_s, say)[0]
    if local:
        say(f"stopped local job(s) {', '.join(local)} ({stopped} process(es))")
    if not slurm_ids and not local:
        say("nothing queued or running")
    return len(slurm_ids) + len(local)
