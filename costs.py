"""What a sweep's jobs used, for `--status` and the report: per job, stage and run, in GPU-hours where GPUs were
allocated and CPU-hours (allocated cores × wall time) otherwise.

    jobs = job_costs(Path("logs/default"))       # {key: JobCost}: every job that ran, each attempt summed
    rows = stage_costs(jobs)                     # one row per stage and one for the sweep
    print(cost_line(jobs, remaining))            # 'cost so far ... left ~...'

Two sources, files only (the analysis never asks a scheduler): each job's own record, one line per attempt and node
in <sweep>/costs/<key>.jsonl (slurm/jobs.py record_cost: wall time, CPU time of everything it started, the largest
process's peak RSS, what Slurm's environment says was allocated, the requeue count), and, for Slurm jobs, what the
launcher read from Slurm's accounting (`sacct`: Elapsed, TotalCPU, MaxRSS, AllocTRES, one record per requeue) into
the sweep record, sweep.json's jobs.<key>.sacct; that one wins where both exist.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

STAGE_ORDER = ("sft", "reference", "dpo", "generate", "judge", "analyze")


@dataclass
class JobCost:
    key: str
    stage: str
    run: str
    """The training run the job serves (a DPO run's training, answers and judging), else ""."""
    elapsed_s: float = 0.0
    """Wall time, summed over attempts (a requeued job's attempts each count)."""
    cpu_s: float = 0.0
    """CPU time its processes used."""
    cpu_hours: float = 0.0
    """Allocated cores × wall time."""
    gpu_hours: float = 0.0
    """Allocated GPUs × wall time."""
    max_rss_gb: float = 0.0
    requeues: int = 0
    attempts: int = 0
    source: str = "job"
    """sacct (the scheduler's accounting) or job (the job's own record)."""

    @property
    def hours(self) -> float:
        """What the job cost in the unit the sweep is charged in: GPU-hours if it had GPUs, else CPU-hours."""
        return self.gpu_hours if self.gpu_hours else self.cpu_hours


def stage_of(key: str) -> tuple[str, str]:
    """(stage, run) of a sweep record key: sft, reference-0, <run>, generate/<model>, judge/<run>, analyze."""
    if key in ("sft", "analyze"):
        return key, "sft" if key == "sft" else ""
    if key.startswith("reference-"):
        return "reference", ""
    if "/" in key:
        stage, name = key.split("/", 1)
        return stage, "" if name in ("calibration", "base") else name
    return "dpo", key


def read_attempts(folder: Path) -> dict[str, list[dict]]:
    """Every job's own cost lines, by key; a torn or foreign line is skipped (accounting is never worth an error)."""
    found: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("key"), str):
                found.setdefault(row["key"], []).append(row)
    return found


def _number(row: dict, key: str) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def from_job_records(key: str, rows: list[dict]) -> JobCost:
    """Sum of attempts; within an attempt (job id, requeue count) the nodes ran side by side: the wall time is the
    longest node's, the allocation every node's."""
    stage, run = stage_of(key)
    cost = JobCost(key, stage, run, source="job")
    attempts: dict[tuple, list[dict]] = {}
    for i, row in enumerate(rows):  # a local job runs on one node: each of its lines is an attempt of its own
        attempts.setdefault((row.get("job_id"), row.get("requeues")) if row.get("job_id") else (i,), []).append(row)
    for nodes in attempts.values():
        cost.elapsed_s += max(_number(r, "elapsed_s") for r in nodes)
        cost.cpu_s += sum(_number(r, "cpu_s") for r in nodes)
        cost.cpu_hours += sum(_number(r, "elapsed_s") * _number(r, "cpus") for r in nodes) / 3600
        cost.gpu_hours += sum(_number(r, "elapsed_s") * _number(r, "gpus") for r in nodes) / 3600
        cost.max_rss_gb = max([cost.max_rss_gb] + [_number(r, "max_rss_gb") for r in nodes])
        cost.requeues = max([cost.requeues] + [int(_number(r, "requeues")) for r in nodes])
    cost.attempts = len(attempts)
    return cost


def from_sacct(key: str, sacct: dict) -> JobCost:
    """sweep.json's jobs.<key>.sacct (slurm/scheduler.py slurm_costs): its records are the job's runs (one per
    requeue), each with Elapsed, TotalCPU, MaxRSS and AllocTRES."""
    stage, run = stage_of(key)
    cost = JobCost(key, stage, run, source="sacct")
    for record in sacct.get("records", []):
        elapsed = _number(record, "elapsed_s")
        cost.elapsed_s += elapsed
        cost.cpu_s += _number(record, "cpu_s")
        cost.cpu_hours += elapsed * _number(record, "cpus") / 3600
        cost.gpu_hours += elapsed * _number(record, "gpus") / 3600
        cost.max_rss_gb = max(cost.max_rss_gb, _number(record, "max_rss_gb"))
    cost.attempts = len(sacct.get("records", []))
    cost.requeues = max(0, cost.attempts - 1)
    return cost


def job_costs(sweep: Path) -> dict[str, JobCost]:
    """Every job of the sweep that has a record of what it used, sacct's where the launcher stored it."""
    try:
        record = json.loads((sweep / "sweep.json").read_text())
    except (OSError, json.JSONDecodeError):
        record = {}
    jobs = record.get("jobs") if isinstance(record.get("jobs"), dict) else {}
    found = {key: from_job_records(key, rows) for key, rows in read_attempts(sweep / "costs").items()}
    for key, job in jobs.items():
        if isinstance(job, dict) and isinstance(job.get("sacct"), dict) and job["sacct"].get("records"):
            found[key] = from_sacct(key, job["sacct"])
    return found


def unit(costs) -> str:
    return "GPU-hours" if any(c.gpu_hours for c in costs) else "CPU-hours"


def stage_costs(jobs: dict[str, JobCost]) -> list[dict]:
    """One row per stage (in pipeline order) and a last one for the whole sweep."""
    rows = []
    for stage in STAGE_ORDER:
        mine = [c for c in jobs.values() if c.stage == stage]
        if mine:
            rows.append(_row(stage, mine))
    if jobs:
        rows.append(_row("total", list(jobs.values())))
    return rows


def run_costs(jobs: dict[str, JobCost]) -> dict[str, dict]:
    """Per training run: its training, its answers and its judging."""
    runs: dict[str, list[JobCost]] = {}
    for c in jobs.values():
        if c.run:
            runs.setdefault(c.run, []).append(c)
    return {run: _row(run, costs) for run, costs in runs.items()}


def _row(name: str, costs: list[JobCost]) -> dict:
    return {"what": name, "jobs": len(costs), "wall_h": sum(c.elapsed_s for c in costs) / 3600,
            "cpu_h_used": sum(c.cpu_s for c in costs) / 3600, "cpu_hours": sum(c.cpu_hours for c in costs),
            "gpu_hours": sum(c.gpu_hours for c in costs), "hours": sum(c.hours for c in costs),
            "max_rss_gb": max(c.max_rss_gb for c in costs), "requeues": sum(c.requeues for c in costs),
            "source": "+".join(sorted({c.source for c in costs}))}


def estimate_left(jobs: dict[str, JobCost], remaining: dict[str, int]) -> tuple[float, list[str]]:
    """(hours, stages without a finished job to go by) for the jobs still to run, `remaining` per stage: each at
    the mean cost of the finished jobs of its stage."""
    hours, unknown = 0.0, []
    for stage, count in remaining.items():
        done = [c.hours for c in jobs.values() if c.stage == stage]
        if count and done:
            hours += count * sum(done) / len(done)
        elif count:
            unknown.append(stage)
    return hours, unknown


def cost_line(jobs: dict[str, JobCost], remaining: dict[str, int]) -> str:
    """`--status`'s cost summary: what the finished attempts used, and an estimate of what is left."""
    what = unit(jobs.values())
    spent = sum(c.hours for c in jobs.values())
    sources = sorted({c.source for c in jobs.values()})
    left, unknown = estimate_left(jobs, remaining)
    todo = sum(remaining.values())
    text = (f"cost so far: {spent:.3f} {what} over {len(jobs)} job(s) ({', '.join(sources) or 'no records yet'}); "
            f"peak RSS {max((c.max_rss_gb for c in jobs.values()), default=0):.2f} GB")
    if todo:
        blind = sum(remaining[stage] for stage in unknown)
        text += f"; left: {todo} job(s)" + (f", ~{left:.3f} {what} at their stages' means" if todo > blind else "") + (
            f" ({blind} in {', '.join(unknown)}: no finished job of {'that stage' if len(unknown) == 1 else 'those stages'}"
            f" to go by yet)" if unknown else "")
    return text
