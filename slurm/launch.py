"""The launcher: one loop that submits what any stages of a sweep still need, whatever the stage.

    plan = Plan(load_sweep(path), path)
    launch(plan, ["generate"], executor="local")      # 0: everything asked for is done, queued or running

On Slurm every target is submitted at once: a stage's targets as one array (or one job each), those waiting on
earlier jobs with a dependency on them (afterok for training, afterany for the rest). With the local and debug
executors no scheduler holds dependencies, so the stages run one after another and each target starts once its
inputs are finished. Every job is filed in the sweep record the moment it is accepted.
"""
from __future__ import annotations

import time
from pathlib import Path

import submitit

import procs
from config import UserInputError, to_yaml
from slurm import jobs as J
from slurm.scheduler import now, record_costs, write_record
from slurm.stages import ORDER, STAGES, TRAINING, Plan, Stage, Target, Training


def launch(plan: Plan, names, executor: str, dry_run: bool = False, say=print) -> int:
    """Submit what the named stages still need, in order: on Slurm all at once, chained by dependencies; locally
    one stage after another, waiting for each. 0 when everything asked for is submitted, finished or running; 1
    when a job failed or a target is blocked."""
    names = [n for n in ORDER if n in names]
    plan.classify(names)
    if not dry_run and record_costs(plan.record, plan.states):  # ended Slurm jobs: what sacct says they used
        write_record(plan.out, plan.record)
    if executor != "slurm" and not dry_run:
        wait_for_local_jobs(plan, names, say)
    todo = to_submit(plan, names, executor)
    for name in names:
        stage, targets = STAGES[name], plan.stage(name)
        header = stage.announce(plan, targets)
        if header:
            say(header)
        if name == "sft" or (name in TRAINING and not any(n in names for n in TRAINING[:TRAINING.index(name)])):
            say(f"sweep {plan.sweep.name}: {len(plan.stage('dpo'))} DPO run(s) in {plan.out}/")
        for t in targets:
            verb = "SUBMIT" if t in todo else {"completed": "skip", "active": "wait", "blocked": "skip"}.get(t.state, "wait")
            say(f"  {verb:6} {name:9} {t.name:24} {t.detail}")
    if any(n in TRAINING for n in names):
        r, launch_cfg = plan.sweep.slurm, plan.sweep.launch
        say(f"each job: {r.nodes} node(s) x "
            f"{f'{r.gpus_per_node} GPU(s)' if r.gpus_per_node else f'{launch_cfg.cpu_processes} CPU process(es)'}, "
            f"{r.cpus_per_task} CPUs, {r.mem_gb:g} GB, {r.timeout_min} min (then checkpoint + requeue)"
            + (f", partition {r.partition}" if r.partition else "") + f"; array at most {r.array_parallelism} at once")
    blocked = [t for n in names for t in plan.stage(n) if t.state == "blocked"]
    if dry_run or not todo:
        say("dry run: nothing submitted" if dry_run else "nothing to submit: every target is finished, queued or "
            "waiting for its inputs")
        if blocked and not dry_run:
            say("blocked: " + "; ".join(f"{t.key} ({t.detail})" for t in blocked))
        return 0 if dry_run or not blocked else 1
    busy = [t for n in names for t in plan.stage(n) if t.state == "active"
            and (plan.executor_of(t) != executor or executor != "slurm")]
    if busy:
        raise UserInputError(f"{', '.join(f'{t.key} ({t.detail})' for t in busy)} still running under another "
                             f"launch; wait for it or --cancel it first")
    code = prepare_submission(plan, todo, executor, names, say)
    ok = True
    for name in names:
        group = [t for t in todo if t.stage == name]
        if not group:
            continue
        if executor == "slurm":
            submit_slurm(plan, STAGES[name], group, code, say)
        else:
            ok = run_here(plan, STAGES[name], group, executor, code, say) and ok
            plan.classify(names)
    if executor == "slurm":
        flag = next((f for f, n in (("--generate", "generate"), ("--judge", "judge"), ("--analyze", "analyze"))
                     if n in names and not any(m in TRAINING for m in names)), "")
        say(f"watch it: python slurm/sweep.py --config {plan.file} {flag} --status".replace("  ", " "))
    return 0 if ok and not blocked else 1


def wait_for_local_jobs(plan: Plan, names: list[str], say, every_s: float = 2.0) -> None:
    """Local jobs of these stages still running from an earlier launcher (one stopped by SIGKILL leaves its jobs
    running, as on Slurm; a live one holds the sweep lock): start nothing beside them (launch.local_parallelism
    counts them) and nothing after them before they end. Waits until they do, then classifies again."""
    told: set[str] = set()
    while not procs.stopping.is_set():
        busy = [t for n in names for t in plan.stage(n) if t.state == "active" and plan.executor_of(t) == "local"]
        if not busy:
            return
        for t in busy:
            if t.key not in told:
                say(f"waiting for {t.key} (local job {plan.record['jobs'][t.key]['job_id']}), started by an earlier "
                    f"launcher, to end; to stop it instead: python slurm/sweep.py --config {plan.file} --cancel")
                told.add(t.key)
        time.sleep(every_s)
        plan.classify(names)


def to_submit(plan: Plan, names: list[str], executor: str) -> list[Target]:
    """The targets this launch submits: those ready now and those waiting (on Slurm a dependency holds them; here
    only on targets this launch runs first)."""
    todo: list[Target] = []
    for t in (t for n in names for t in plan.stage(n)):
        if t.state == "submit":
            todo.append(t)
        elif t.state == "waiting" and (executor == "slurm" or all(d in todo for d in t.deps if d.state != "completed")):
            todo.append(t)
    return todo


def prepare_submission(plan: Plan, todo: list[Target], executor: str, names: list[str], say) -> Path:
    """Write the configs the jobs read (each training job's resolved config, the held-out pairs' config), snapshot
    the code, and open a submission in the sweep record."""
    for t in todo:
        t.spec["costs"] = str(plan.out / "costs")  # where the job writes what it used (slurm/jobs.py record_cost)
        if t.job is not None:
            t.job.config_path.parent.mkdir(parents=True, exist_ok=True)
            t.job.config_path.write_text(f"# written by slurm/sweep.py for {plan.file}\n" + to_yaml(t.job.config))
    if any(t.stage in ("generate", "judge") for t in todo):
        path, text = plan.heldout()
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    code = J.snapshot_code(plan.out)
    say(f"code snapshot: {code}")
    plan.submission = {"time": now(), "config": plan.file, "code": str(code), "executor": executor,
                       "stages": names, "jobs": {}}
    plan.record["submissions"].append(plan.submission)
    return code


def remember(plan: Plan, t: Target, job_id: str, executor: str) -> None:
    """File a job in the sweep record the moment it is accepted, so a later failure cannot orphan it."""
    plan.record["jobs"][t.key] = {"job_id": job_id, "executor": executor, "submitted": now()}
    plan.submission["jobs"][t.key] = job_id
    write_record(plan.out, plan.record)
    t.job_id, t.state, t.detail = job_id, "active", f"job {job_id} submitted"
    plan.states[t.key] = "PENDING"


def _task(stage: Stage, plan: Plan, code: Path, executor: str):
    return stage.job(plan, code, executor) if isinstance(stage, Training) else stage.job(plan, code)


def submit_slurm(plan: Plan, stage: Stage, todo: list[Target], code: Path, say) -> None:
    """Waves (a target waiting on another of this stage goes after it), each split into what is ready and what
    waits on earlier jobs; each group one array (or one job per target) with its dependencies."""
    waves, placed = [], set()
    while len(placed) < len(todo):
        wave = [t for t in todo if t not in placed and not any(d in todo and d not in placed for d in t.deps)]
        waves.append(wave)
        placed.update(wave)
    task = _task(stage, plan, code, "slurm")
    for wave in waves:
        groups = [[t for t in wave if not after(t)], [t for t in wave if after(t)]] if stage.arrays else [[t] for t in wave]
        for group in (g for g in groups if g):
            deps = sorted({j for t in group for j in after(t)})
            executor = J.make_executor("slurm", plan.out, code, plan.sweep.name, stage.resources(plan), deps,
                                       stage.dependency)
            try:
                handles = executor.map_array(task, [t.spec for t in group]) if stage.arrays else \
                    [executor.submit(task, group[0].spec)]
            except submitit.core.utils.FailedJobError as e:
                raise UserInputError(f"sbatch refused the job: {str(e).strip()}") from None
            for t, handle in zip(group, handles):
                remember(plan, t, str(handle.job_id), "slurm")
            say(stage.submitted_line(group, str(handles[0].job_id).split("_")[0] if stage.arrays else
                                     str(handles[0].job_id), deps))


def after(t: Target) -> list[str]:
    """The Slurm jobs a target must wait for: its unfinished inputs' jobs (the analysis: every job still active)."""
    if t.stage == "analyze":
        return list(t.spec.get("after", []))
    return [d.job_id for d in t.deps if d.state != "completed" and d.job_id]


def run_here(plan: Plan, stage: Stage, todo: list[Target], executor: str, code: Path, say) -> bool:
    """local/debug executors: no scheduler holds dependencies, so a target starts once its inputs are finished;
    DPO runs launch.local_parallelism at a time (local), everything else one at a time."""
    res = stage.resources(plan)
    submitter = J.make_executor(executor, plan.out, code, plan.sweep.name, res)
    task = _task(stage, plan, code, executor)
    width = plan.sweep.launch.local_parallelism if stage.name == "dpo" and executor == "local" else 1
    pending, running, ok = list(todo), [], True
    while (pending and not procs.stopping.is_set()) or running:
        while pending and len(running) < width and not procs.stopping.is_set():  # stopping: start nothing new
            t = pending.pop(0)
            if t.state in ("completed", "active"):  # finished meanwhile (a reference no run needs any more)
                continue
            unfinished = [d for d in t.deps if d.state != "completed"]
            if unfinished:
                say(f"{stage.label(t)} skipped: " + ", ".join(f"{d.key} did not finish" for d in unfinished))
                ok = False
                continue
            handle = submitter.submit(task, t.spec)
            remember(plan, t, str(handle.job_id), executor)
            say(f"started {stage.label(t)} ({executor} job {handle.job_id})")
            running.append((t, handle))
        while executor == "local" and running and not any(h.done() for _, h in running):
            time.sleep(1)
        for t, handle in [(t, h) for t, h in running if executor == "debug" or h.done()]:
            running.remove((t, handle))
            try:
                result = handle.result()
            except Exception as e:  # submitit's error holds the job's traceback; its last line names the failure
                say(f"{stage.label(t)} FAILED: {J.failure_line(e)}"
                    + (f"; log: {handle.paths.stderr}" if executor == "local" else ""))
                t.state, ok = "failed", False
                continue
            t.state = "completed"
            say(stage.finished_line(t, result))
    return ok
