"""The whole loop in one command: prepare the models -> SFT -> reference log-probs -> DPO sweep -> answers -> judge
-> report. Every stage skips what is already finished, so running the command again continues where it stopped.

    python pipeline.py --config configs/sweep_default.yaml                # the main job (`make demo` runs this)
    python pipeline.py --config configs/sweep_tiny.yaml --executor local  # local processes even where Slurm is up
    python pipeline.py --config configs/sweep_mistral7b.yaml slurm.partition=gpu slurm.account=me --detach
    python pipeline.py --config configs/sweep_default.yaml --status       # one line per stage
    python pipeline.py --config configs/sweep_default.yaml --stage judge  # only this stage (those before it done)
    python pipeline.py --config configs/sweep_default.yaml --redo judge   # set judge's outputs (and what depends on
                                                                          # them) aside, then make them again
    python pipeline.py --config configs/sweep_mistral7b.yaml --plan --gpu h100-80gb   # memory per GPU, no jobs

Stages, in order: prepare (the local models this project builds: the default SmolLM2 checkpoint, tiny test models),
sft, reference, dpo (slurm/sweep.py), generate (sweep.py --generate), judge (--judge), analyze (--analyze, writes
report/<name>/). `--executor auto` (the default) uses Slurm when `sinfo` answers and local processes otherwise.
On Slurm every stage is submitted at once, chained by job dependencies, and the command follows the jobs until the
report is written; --detach returns once they are queued (the analysis job writes the report when they end), and
Ctrl-C stops only the following. Locally the stages run one after another. Either way a progress line is printed
whenever a stage moves, and a table of stages and times at the end. --redo moves outputs to
<root>/<name>/replaced/<time>/, never deletes them.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import procs
from config import UserInputError
from jsonl import read_jsonl
from models import DEFAULT_MODEL_DIR, TINY_ARCHS, is_local, prepare_default_model, save_tiny_model
from progress import PREFIX as PROGRESS
from slurm import stages as st
from slurm.jobs import ANALYSIS_MARKER
from slurm.launch import launch
from slurm.plan import plan_sweep
from slurm.scheduler import read_record, record_costs, scheduler_states, sweep_lock, write_record
from slurm.spec import Sweep, load_sweep
from slurm.sweep import say as sweep_say

REPO = Path(__file__).resolve().parent
STAGES = ("prepare", *st.ORDER)


def say(message: str) -> None:
    print(f"[pipeline {datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def choose_executor(requested: str) -> tuple[str, str]:
    """(executor, why): auto means Slurm when its controller answers, local processes otherwise."""
    if requested != "auto":
        return requested, "as asked"
    if not (shutil.which("sinfo") and shutil.which("sbatch")):
        return "local", "no Slurm commands here"
    try:
        answer = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return "local", "sinfo did not answer"
    if answer.returncode != 0 or "up" not in answer.stdout.split():
        return "local", "no Slurm partition is up (slurm/local_cluster.sh up starts one here)"
    return "slurm", "the Slurm controller answers"


# ---------------------------------------------------------------- prepare: models this project can build


def local_models(sweep: Sweep, jobs) -> list[tuple[str, str]]:
    """(path, the sweep key naming it) for every model the sweep reads from a local folder it does not train."""
    named = [(sweep.sft.path, "sft.path")] if sweep.sft.path else []
    for job in (j for j in jobs if j.kind == "sft"):
        named += [(job.config.model.path, f"{sweep.base}: model.path"),
                  (job.config.model.tokenizer, f"{sweep.base}: model.tokenizer")]
    named += [(model, "judge.judge_model") for model in sweep.judge.judge_model]  # a panel: every judge
    seen, out = set(), []
    for path, key in named:
        if path and is_local(path) and path not in seen:
            seen.add(path)
            out.append((path, key))
    return out


def buildable(path: str) -> str | None:
    """'default' or a tiny architecture if `path` is a model this project can make here, else None."""
    resolved = Path(path).expanduser().resolve()
    if resolved == DEFAULT_MODEL_DIR.resolve():
        return "default"
    for arch in TINY_ARCHS:
        if resolved == (REPO / "models" / f"tiny-{arch}").resolve():
            return arch
    return None


def prepare_state(sweep: Sweep, jobs) -> tuple[str, str]:
    missing = [(p, k) for p, k in local_models(sweep, jobs) if not Path(p).expanduser().is_dir()]
    if not missing:
        return "completed", "every local model is there"
    return "todo", "to make: " + ", ".join(p for p, _ in missing)


def prepare(sweep: Sweep, jobs) -> int:
    todo = [(p, k) for p, k in local_models(sweep, jobs) if not Path(p).expanduser().is_dir()]
    unknown = [f"{p} ({k})" for p, k in todo if buildable(p) is None]
    if unknown:
        raise UserInputError(f"model folder(s) not found: {', '.join(unknown)}; copy the checkpoint there or point "
                             f"the key at a folder that exists")
    for path, key in sorted(todo, key=lambda pk: buildable(pk[0]) != "default"):  # tiny models take its tokenizer
        kind = buildable(path)
        if kind == "default":
            say(f"prepare: converting the embedded SmolLM2-135M-Instruct GGUF into {path} ({key})")
            prepare_default_model(DEFAULT_MODEL_DIR)
        else:
            if not (DEFAULT_MODEL_DIR / "config.json").is_file():
                prepare_default_model(DEFAULT_MODEL_DIR)
            say(f"prepare: writing a tiny random {kind} model to {path} ({key})")
            save_tiny_model(kind, Path(path))
    return 0


# ---------------------------------------------------------------- where every stage stands


class Snapshot:
    """Every stage's targets with their state (slurm/stages.py: completed | active | submit | waiting | blocked),
    and the prepare stage's."""

    def __init__(self, sweep: Sweep, sweep_file: str):
        self.sweep, self.sweep_file = sweep, sweep_file
        self.plan = st.Plan(sweep, sweep_file).classify()
        self.out, self.jobs = self.plan.out, self.plan.jobs
        self.report = self.plan.stage("analyze")[0]
        self.judging = self.plan.stage("judge")
        self.prepare = prepare_state(sweep, self.jobs)

    def items(self, stage: str) -> list:
        return [] if stage == "prepare" else self.plan.stage(stage)

    def state(self, stage: str) -> str:
        """completed | active (something runs or is queued) | todo (something left to do, nothing running)."""
        if stage == "prepare":
            return self.prepare[0]
        states = {i.state for i in self.items(stage)}
        if states <= {"completed"}:
            return "completed"
        return "active" if "active" in states else "todo"

    def cell(self, stage: str) -> str:
        """A stage's share of the progress line: done, or n/m done and what the running items have got to."""
        if stage == "prepare":
            return f"prepare {'done' if self.prepare[0] == 'completed' else 'to do'}"
        items = self.items(stage)
        done = sum(i.state == "completed" for i in items)
        if stage == "sft" and self.sweep.sft.path:
            return "sft given"
        if done == len(items):
            return f"{stage} done" if len(items) <= 1 else f"{stage} {done}/{len(items)} done"
        queued = [i for i in items if i.state == "waiting" or (i.state == "active" and "PENDING" in i.detail)]
        running = [self.progress(stage, i) for i in items if i.state == "active" and i not in queued]
        parts = running + ([f"{len(queued)} queued"] if queued else [])
        return f"{stage} {done}/{len(items)}" + (" (" + ", ".join(parts) + ")" if parts else "")

    def progress(self, stage: str, item) -> str:
        if stage in ("sft", "dpo"):
            train, _ = st.last_rows(Path(item.config.output_dir) / "metrics.jsonl")
            return f"{item.key} step {train.get('step', 0)}/{item.config.train.max_steps}"
        if stage in ("generate", "judge"):
            rows = len(read_jsonl(item.out)) if item.out.is_file() else 0
            return f"{item.name} {rows} {'answers' if stage == 'generate' else 'verdicts'}"
        return f"{item.name} running"

    def line(self, stages=STAGES) -> str:
        return " | ".join(self.cell(s) for s in stages)


def snapshot(sweep: Sweep, sweep_file: str) -> Snapshot | None:
    try:
        return Snapshot(sweep, sweep_file)
    except Exception as e:  # a file caught half-written (config.yaml, run.json): the next look will do
        say(f"(could not read the sweep's state: {e})")
        return None


def print_status(snap: Snapshot) -> None:
    rows = []
    for stage in STAGES:
        items = [] if stage == "prepare" else snap.items(stage)
        detail = snap.prepare[1] if stage == "prepare" else "; ".join(
            f"{i.name}: {i.state}" for i in items)
        rows.append({"stage": stage, "state": snap.state(stage), "items": len(items) or 1, "detail": detail})
    st.print_table(rows, {k: k for k in rows[0]})
    print(st.cost_status(snap.plan))


# ---------------------------------------------------------------- redo: set outputs aside


def redo(stage: str, snap: Snapshot) -> None:
    """Move `stage`'s outputs and those of every later stage to <sweep>/replaced/<time>/: they are made again."""
    later = STAGES[STAGES.index(stage):]
    busy = [f"{s}: {i.name}" for s in later for i in snap.items(s) if i.state == "active"]
    if busy:
        raise UserInputError(f"cannot redo {stage} while its jobs run ({', '.join(busy)}); wait, or cancel them: "
                             f"python slurm/sweep.py --config {snap.sweep_file} --cancel")
    out = snap.out
    paths = {"sft": [] if snap.sweep.sft.path else [out / "sft"],
             "reference": [out / "ref_cache"] + [Path(t.spec["marker"]) for t in snap.items("reference")],
             "dpo": [out / t.key for t in snap.items("dpo")],
             "generate": [out / "generations"], "judge": [out / "judgments"],
             "analyze": [out / ANALYSIS_MARKER]}
    (out / "replaced").mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=datetime.datetime.now().strftime("%Y%m%d-%H%M%S-"), dir=out / "replaced"))
    moved = []
    for s in later:
        for path in paths[s]:
            if path.exists():
                (target / path.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
                path.rename(target / path.relative_to(out))
                moved.append(str(path.relative_to(out)))
    say(f"redo {stage}: moved {', '.join(moved) or 'nothing (no outputs yet)'}"
        + (f" to {target}/" if moved else "") + f"; {', '.join(later)} will be made again")


# ---------------------------------------------------------------- running the stages


def run_stage(stage: str, executor: str, sweep: Sweep, sweep_file: str) -> int:
    """One stage through slurm/launch.py, as `slurm/sweep.py` runs it for that stage's flag."""
    if stage == "prepare":
        return prepare(sweep, st.Plan(sweep, sweep_file).jobs)
    plan = st.Plan(sweep, sweep_file)
    with sweep_lock(plan.out):
        return launch(plan, [stage], executor, say=sweep_say)


def check_upstream(stages: list[str], snap: Snapshot, executor: str) -> None:
    """--stage X runs X alone: every stage before it must be finished (or, on Slurm, queued: X waits for it)."""
    first = STAGES.index(stages[0])
    for before in STAGES[:first]:
        state = snap.state(before)
        if state == "completed" or (executor == "slurm" and state == "active"):
            continue
        raise UserInputError(f"--stage {stages[0]} needs {before} finished first (it is {state}): run "
                             f"`python pipeline.py --config {snap.sweep_file} --stage {before}`, or leave out --stage")


class LogRelay:
    """The newest "[progress]" line (progress.py) of each job log written since the pipeline started: the jobs'
    reference passes, evals, generation and judging report there, locally and on Slurm alike."""

    def __init__(self, folder: Path, since: float):
        self.folder, self.since, self.offsets = folder, since - 5, {}

    def lines(self) -> list[str]:
        new = []
        for path in sorted(self.folder.glob("*_log.err")) if self.folder.is_dir() else []:
            try:
                size, mtime = path.stat().st_size, path.stat().st_mtime
            except OSError:
                continue
            offset = self.offsets.get(path, 0)
            if size < offset:  # rewritten (a requeued job): read it from the start
                offset = 0
            if mtime < self.since or size <= offset:
                continue
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read(size - offset)
            end = chunk.rfind(b"\n")
            if end < 0:
                continue
            self.offsets[path] = offset + end + 1
            found = [line[line.index(PROGRESS):] for line in chunk[:end].decode(errors="replace").splitlines()
                     if PROGRESS in line]
            new += found[-1:]
        return new


def follow(sweep: Sweep, sweep_file: str, started: float, every_s: float, until,
           finished: threading.Event | None = None, done_at: dict | None = None) -> Snapshot | None:
    """Print the progress line whenever it changes and the jobs' own progress lines as they come (checking every
    `every_s` seconds, or at once when `finished` is set) until until(snapshot). done_at gets the time each stage
    that was not finished at the start was first seen finished."""
    last, snap, finished = None, None, finished or threading.Event()
    relay, unfinished = None, None
    while True:
        snap = snapshot(sweep, sweep_file) or snap
        if snap is not None:
            relay = relay or LogRelay(snap.out / "submitit", started)
            unfinished = unfinished if unfinished is not None else {s for s in STAGES if snap.state(s) != "completed"}
            for stage in unfinished:
                if done_at is not None and stage not in done_at and snap.state(stage) == "completed":
                    done_at[stage] = time.time()
            for line in relay.lines():
                say(line)
            line = snap.line()
            if line != last:
                say(f"+{elapsed(time.time() - started)} {line}")
                last = line
            if until(snap):
                return snap
        finished.wait(every_s)


def elapsed(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes}m{s:02d}s"


def run_local(args, sweep: Sweep, stages: list[str], started: float) -> dict[str, tuple[int, float]]:
    """Stages one after another in a worker thread; this thread prints the progress line as they go."""
    results: dict[str, tuple[int, float]] = {}
    errors: list[BaseException] = []
    finished = threading.Event()

    def work():
        try:
            for stage in stages:
                t0 = time.time()
                say(f"stage {stage}")
                results[stage] = (run_stage(stage, args.executor, sweep, args.config), time.time() - t0)
        except BaseException as e:  # handed to the main thread, which prints it like any other error
            errors.append(e)
        finished.set()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    follow(sweep, args.config, started, args.progress_s, lambda snap: finished.is_set(), finished)
    worker.join()
    if errors:
        raise errors[0]
    return results


def summary(snap: Snapshot, stages: list[str], results: dict, started: float, done_at: dict | None = None) -> int:
    """The stage table: "this run" is each stage's own time (local), or on Slurm the time from the previous stage's
    end (or the start) to its end as this command saw it, queueing included."""
    rows, previous = [], started
    for s in stages:
        took = "-"
        if s in results:
            took, previous = elapsed(results[s][1]), max(previous, started + results[s][1])
        elif done_at and s in done_at:
            took, previous = f"{elapsed(done_at[s] - previous)} (wall)", done_at[s]
        rows.append({"stage": s, "state": snap.state(s), "this run": took, "detail": snap.cell(s)})
    st.print_table(rows, {k: k for k in rows[0]})
    with contextlib.suppress(UserInputError):  # another launcher holds the sweep: it records them itself
        with sweep_lock(snap.out):
            record = read_record(snap.out)
            if record_costs(record, scheduler_states(record, snap.out)):
                write_record(snap.out, record)
    say(st.cost_status(snap.plan))
    for t in snap.judging:
        if t.state == "completed":
            say(f"{t.name}: {st.judged_line(t.out)}")
    if snap.report.state == "completed":
        say(f"report: {snap.report.out}/README.md")
    unfinished = [s for s in stages if snap.state(s) != "completed"]
    say(f"done in {elapsed(time.time() - started)}" + (f"; not finished: {', '.join(unfinished)}" if unfinished else
                                                      "; every stage finished"))
    return 1 if unfinished else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweep_default.yaml")
    parser.add_argument("--executor", choices=("auto", "slurm", "local", "debug"), default="auto",
                        help="auto (default): Slurm when sinfo answers, else local processes")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--status", action="store_true", help="print where every stage stands; run nothing")
    mode.add_argument("--plan", action="store_true", help="print the per-GPU memory plan of the sweep's training "
                                                           "(slurm/plan.py); run nothing")
    parser.add_argument("--gpu", help="with --plan: the GPU to check against, e.g. h100-80gb, h200, a100-40gb")
    parser.add_argument("--stage", action="append", choices=STAGES,
                        help="run only this stage (repeatable); the stages before it must be finished")
    parser.add_argument("--redo", choices=STAGES[1:],
                        help="move this stage's outputs and those of the stages after it aside, then make them again")
    parser.add_argument("--detach", action="store_true", help="on Slurm: return once the jobs are queued")
    parser.add_argument("--progress-s", type=float, default=15.0, help="seconds between progress checks")
    parser.add_argument("--retry-pruned", action="store_true",
                        help="train pruned runs on from their checkpoints instead of counting them finished")
    parser.add_argument("overrides", nargs="*", help="sweep overrides: slurm.partition=gpu grid.loss.beta=[0.1,0.3]")
    args = parser.parse_intermixed_args(argv)
    if args.progress_s <= 0:
        parser.error(f"--progress-s {args.progress_s:g}: must be positive")
    if args.gpu and not args.plan:
        parser.error("--gpu goes with --plan")
    started, out, grace_s = time.time(), None, 60.0
    if argv is None:  # the command itself (not a call from another program): it owns its signals
        procs.stop_on_signals()  # a closed terminal or `timeout` stops the local jobs too, as Ctrl-C does
    try:
        sweep = load_sweep(args.config, args.overrides)
        grace_s = float(sweep.slurm.signal_delay_s)  # the time a run is given to checkpoint before a time limit
        sweep.retry_pruned = args.retry_pruned  # every plan made of this sweep, in every stage, sees it
        if args.plan:
            print("\n".join(plan_sweep(args.config, args.overrides, args.gpu)))
            return 0
        snap = Snapshot(sweep, args.config)
        out = snap.out
        if args.status:
            print_status(snap)
            return 0
        args.executor, why = choose_executor(args.executor)
        if args.executor == "slurm" and not shutil.which("sbatch"):
            raise UserInputError("sbatch not found: this is not a Slurm login node; use --executor local")
        stages = [s for s in STAGES if s in (args.stage or STAGES)]
        say(f"sweep {sweep.name} ({args.config}) -> {out}/, {snap.report.out}/; executor {args.executor} ({why})")
        say(snap.line(stages))
        if args.stage:
            if args.redo and args.redo not in stages:
                raise UserInputError(f"--redo {args.redo} makes {args.redo} again: add --stage {args.redo}, or leave "
                                     f"out --stage")
            check_upstream(stages, snap, args.executor)
        if args.redo:
            with sweep_lock(out):
                redo(args.redo, snap)
            snap = Snapshot(sweep, args.config)
        unfinished = [s for s in stages if snap.state(s) != "completed"]
        # from the first unfinished stage on: a stage made again makes everything after it stale
        todo = stages[stages.index(unfinished[0]):] if unfinished else []
        if not todo:
            return summary(snap, stages, {}, started)
        say(f"to do: {', '.join(todo)}")
        if args.executor != "slurm":
            with sweep_lock(out):  # the whole run: a second launcher refuses instead of starting jobs beside ours
                results = run_local(args, sweep, todo, started)
                return summary(Snapshot(sweep, args.config), stages, results, started)
        results = {}
        for stage in todo:
            t0 = time.time()
            results[stage] = (run_stage(stage, args.executor, sweep, args.config), time.time() - t0)
        if args.detach:
            say(f"queued; the analysis job writes {snap.report.out}/ when the rest ends. Follow with: python "
                f"pipeline.py --config {args.config} (it submits nothing twice), or --status")
            return 0
        say("following the jobs (Ctrl-C stops following; the jobs go on)")
        done_at = {s: started + results[s][1] for s in results if s == "prepare"}
        try:
            snap = follow(sweep, args.config, started, args.progress_s,
                          lambda s: not any(i.state == "active" for st in todo if st != "prepare" for i in s.items(st)),
                          done_at=done_at)
        except KeyboardInterrupt:
            say(f"stopped following; the jobs go on. Again: python pipeline.py --config {args.config}")
            return 130
        return summary(snap, stages, {s: results[s] for s in results if s == "prepare"}, started, done_at)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM or SIGHUP: local jobs are this command's children
        say(procs.interrupted(e, grace_s, say)  # training checkpoints at its next step boundary
            + f"; finished results stay on disk. Again: python pipeline.py --config {args.config}")
        return 130


if __name__ == "__main__":
    sys.exit(main())
