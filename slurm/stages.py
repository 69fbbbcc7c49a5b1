"""The stage protocol, written once: every stage of a sweep answers the same questions, and one launcher loops over
them.

    plan = Plan(load_sweep("configs/sweep_tiny.yaml"), "configs/sweep_tiny.yaml")
    plan.classify()                                  # every target: completed | active | submit | waiting | blocked
    print_table(*status_table(plan, ["generate"]))
    slurm.launch.launch(plan, ["sft", "reference", "dpo"], executor="slurm")    # submits what is not done

Stages, in order: sft, reference (reference log-probs, once per distinct reference and data), dpo (one job array),
generate (answers from the SFT model and every DPO run), judge (the judge's calibration, then every DPO run against
SFT), analyze (analyze_sweep.py, writing the report). Each stage says, for its targets:
  planned    Plan builds them from the sweep file (with the config or arguments each job receives);
  done       a marker or record on disk says so: run.json completed for the same config; answers, verdicts or
             report whose marker names the same arguments and inputs;
  state      the sweep record and the scheduler: active (queued or running), submit (its inputs are ready), waiting
             (its inputs are being made by jobs queued on Slurm, or submitted by this launch), blocked;
  submitted  as single jobs or arrays, with afterok (training) or afterany (the rest) dependencies on Slurm, and one
             after another (DPO runs launch.local_parallelism at a time) with the local and debug executors;
  status     one table row per target (--status).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from arguments import pairs_file
from config import Config, UserInputError, config_changes, to_argv
from costs import cost_line, job_costs
from jsonl import read_jsonl, summary_path
from slurm import jobs as J
from slurm.scheduler import ACTIVE_STATES, read_record, scheduler_states
from slurm.spec import (Sweep, TrainingJob, generate_args, heldout_config, judge_args, needs_reference, reference_group,
                        training_jobs)

ORDER = ("sft", "reference", "dpo", "generate", "judge", "analyze")
TRAINING = ("sft", "reference", "dpo")


@dataclass(eq=False)
class Target:
    """One job of a stage: a training run, a model's answers, a comparison, the report."""
    stage: str
    key: str                  # the sweep record's key: sft, reference-0, beta0.1_seed0, generate/sft, judge/<run>
    name: str                 # what lines and tables call it
    out: Path                 # what it writes: a run folder, an answer or verdict file, the report folder
    spec: dict                # what the job receives: paths and arguments, never models
    deps: list = field(default_factory=list)    # the targets whose outputs it reads
    job: TrainingJob | None = None              # training targets: the resolved config
    state: str = ""
    detail: str = ""
    job_id: str = ""
    pruned: str = ""          # why its DPO run was pruned (the run, its answers and its judging), else ""

    @property
    def config(self) -> Config | None:
        return self.job.config if self.job else None


class Plan:
    """Every target of every stage of a sweep, with its dependencies, and where each stands."""

    def __init__(self, sweep: Sweep, sweep_file: str, retry_pruned: bool = False):
        self.sweep, self.file, self.out = sweep, str(sweep_file), sweep.folder
        self.retry_pruned = retry_pruned or sweep.retry_pruned  # pruned runs are finished unless a launch asks
        self.jobs = training_jobs(sweep, self.file)
        self.targets: list[Target] = []
        for stage in STAGES.values():
            self.targets += stage.plan(self)
        self.record, self.states = {"jobs": {}, "submissions": []}, {}
        self.submission: dict | None = None  # the sweep record's entry for the launch under way

    def stage(self, name: str) -> list[Target]:
        return [t for t in self.targets if t.stage == name]

    def target(self, key: str) -> Target | None:
        return next((t for t in self.targets if t.key == key), None)

    def heldout(self) -> tuple[Path, str]:
        return heldout_config(self.jobs, self.sweep, self.file)

    def executor_of(self, t: Target) -> str:
        return self.record["jobs"].get(t.key, {}).get("executor", "")

    def classify(self, launching=(), query: bool = True) -> "Plan":
        """Every target's state. `launching`: the stages this launch submits (a target waiting only on their
        targets is waiting, not blocked). query=False keeps the record and states read last (a Slurm launch that
        just submitted an earlier stage knows its jobs better than sacct does yet)."""
        if query:
            self.record = read_record(self.out)
            self.states = scheduler_states(self.record, self.out)
        for name in ORDER:
            STAGES[name].classify(self, self.stage(name), set(launching))
        return self


def settle(t: Target, done: str | None, record: dict, states: dict, launching=(), deps_done: bool = True) -> None:
    """The rule every stage shares: completed when done (and, if deps_done, its inputs are); else active while its
    job is queued or running; else submit once its inputs are made; waiting while they are being made by jobs queued
    on Slurm (a dependency can name them) or submitted by this launch (`launching`: its stages); blocked otherwise."""
    t.job_id = record["jobs"].get(t.key, {}).get("job_id", "")
    state = states.get(t.key, "")
    pending = [d for d in t.deps if d.state != "completed"]
    if done is not None and not (deps_done and pending):
        t.state, t.detail = "completed", done
    elif state in ACTIVE_STATES:
        t.state, t.detail = "active", f"job {t.job_id} is {state}"
    elif not pending:
        t.state, t.detail = "submit", (f"job {t.job_id} ended {state or 'without a record'}" if t.job_id else "new")
    elif all((d.state == "active" and record["jobs"].get(d.key, {}).get("executor") == "slurm")
             or (d.state in ("submit", "waiting") and d.stage in launching) for d in pending):
        t.state, t.detail = "waiting", "after " + ", ".join(f"{d.key} ({d.state})" for d in pending)
    else:
        t.state, t.detail = "blocked", "needs " + ", ".join(f"{d.key} ({d.state}: {d.detail})" for d in pending)


# ---------------------------------------------------------------- the stages


class Stage:
    """What a stage answers; the defaults fit generate and judge (scripts with done markers, afterany)."""
    name = ""
    dependency = "afterany"   # training stages: afterok, so a failed stage cancels what depends on it
    arrays = True             # submitted as job arrays (map_array); else one job each (submit)

    def plan(self, plan: Plan) -> list[Target]:
        raise NotImplementedError

    def classify(self, plan: Plan, targets: list[Target], launching: set) -> None:
        for t in targets:
            t.pruned = next((d.pruned for d in t.deps if d.pruned), "")
            if t.pruned:  # nothing to answer with or judge: finished as it is
                settle(t, f"skipped: its run was {t.pruned}", plan.record, plan.states, launching, deps_done=False)
            else:
                settle(t, self.done(plan, t), plan.record, plan.states, launching)

    def done(self, plan: Plan, t: Target) -> str | None:
        """A line saying why the target is finished, or None."""
        if t.out.is_file() and J.read_json(Path(t.spec["marker"])) == self.marker(t):
            return self.done_detail(t)
        return None

    def marker(self, t: Target) -> dict:
        raise NotImplementedError

    def done_detail(self, t: Target) -> str:
        return "finished, same inputs and settings"

    def resources(self, plan: Plan):
        return plan.sweep.resources(self.name)

    def job(self, plan: Plan, code: Path):
        return J.ScriptJob(str(code), os.getcwd(), dict(plan.sweep.launch.env), self.resources(plan).gpus_per_node)

    def label(self, t: Target) -> str:
        return t.name

    def announce(self, plan: Plan, targets: list[Target]) -> str:
        return f"sweep {plan.sweep.name}: {len(targets)} {self.name} target(s)"

    def submitted_line(self, group: list[Target], job_id: str, after: list[str]) -> str:
        return f"submitted {len(group)} {self.name} target(s) as array job {job_id}" + \
            (f" (after jobs {', '.join(after)} end)" if after else "")

    def finished_line(self, t: Target, result) -> str:
        return f"{t.name} done"

    def status_row(self, plan: Plan, t: Target) -> dict:
        return {"target": t.name, "job": t.job_id or "-", "state": plan.states.get(t.key, "-"),
                "done": "yes" if t.state == "completed" else "no", "detail": t.detail}


def run_status(job: TrainingJob) -> tuple[str | None, str]:
    """(run.json status or None, why a run folder cannot be reused). A folder holding another config is an error."""
    out = Path(job.config.output_dir)
    run_json, saved = out / "run.json", out / "config.yaml"
    if not run_json.is_file():
        return None, ""
    changed = config_changes(yaml.safe_load(saved.read_text()) or {}, job.config) if saved.is_file() else []
    if changed:
        return None, f"{out} holds a run of a different config ({'; '.join(changed[:4])})"
    return J.read_json(run_json).get("status") or ("unreadable" if run_json.stat().st_size else None), ""


def last_rows(path: Path) -> tuple[dict, dict]:
    """The last train row and the last eval row of a metrics.jsonl."""
    rows = read_jsonl(path) if path.is_file() else []
    train = next((r for r in reversed(rows) if r.get("split") == "train"), {})
    evaluation = next((r for r in reversed(rows) if r.get("split") == "eval"), {})
    return train, evaluation


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


class Training(Stage):
    """sft, reference or dpo: train_dpo.py under accelerate launch. A run is done when its run.json says completed
    for the same resolved config; a reference precompute when its marker matches the config and the model."""
    dependency = "afterok"

    def __init__(self, kind: str):
        self.name = kind
        self.arrays = kind == "dpo"

    def plan(self, plan: Plan) -> list[Target]:
        targets = []
        sft = next((t for t in plan.targets if t.key == "sft"), None)
        for job in (j for j in plan.jobs if j.kind == self.name):
            spec = {"key": job.key, "config": str(job.config_path.resolve()),
                    "mode": "reference" if job.kind == "reference" else "train", "output_dir": job.config.output_dir,
                    "mixed_precision": job.config.train.mixed_precision,
                    "reference": job.config.loss.reference_path or job.config.model.path,
                    "marker": str(job.config_path.resolve().with_suffix(".done"))}
            deps = [sft] if sft and job.kind != "sft" else []
            if job.kind == "dpo" and needs_reference(job.config):
                group = reference_group(job.config)
                deps += [t for t in plan.targets if t.stage == "reference" and reference_group(t.config) == group]
            out = Path(job.config.output_dir) if job.kind != "reference" else job.config_path
            targets.append(Target(self.name, job.key, job.key, out, spec, deps, job))
        return targets

    def classify(self, plan: Plan, targets: list[Target], launching: set) -> None:
        conflicts = []
        for t in targets:
            done = None
            if self.name == "reference":
                if J.read_json(Path(t.spec["marker"])) == self._marker(t) and t.job.config_path.is_file() and \
                        not config_changes(yaml.safe_load(t.job.config_path.read_text()) or {}, t.config):
                    done = "reference log-probs already cached for this config and model"
            else:
                status, conflict = run_status(t.job)
                conflicts += [conflict] if conflict else []
                if status == "completed":
                    done = "finished (run.json: completed, same config)"
                elif status == "pruned" and not plan.retry_pruned:
                    pruned = J.read_json(Path(t.config.output_dir) / "run.json").get("pruned") or {}
                    t.pruned = f"pruned at step {pruned.get('step', '?')} ({pruned.get('reason', 'no reason recorded')})"
                    done = f"{t.pruned}; --retry-pruned trains it on"
            # a finished run is finished whatever became of the SFT model since; a cached reference is not
            settle(t, done, plan.record, plan.states, launching, deps_done=self.name == "reference")
        if conflicts:
            raise UserInputError("run folders hold other configs; delete them or give the sweep a new name:\n  "
                                 + "\n  ".join(conflicts))
        if self.name == "dpo":  # a reference is worth computing only for runs still to train
            for ref in plan.stage("reference"):
                if ref.state != "completed" and ref.state != "active" and not any(
                        ref in t.deps and t.state in ("submit", "waiting", "blocked") for t in targets):
                    ref.state, ref.detail = "completed", "not needed (its runs are finished or queued)"

    @staticmethod
    def _marker(t: Target) -> dict | None:
        try:
            return J.reference_marker(t.spec)
        except OSError:
            return None

    def resources(self, plan: Plan):
        return plan.sweep.resources("dpo" if self.name == "dpo" else self.name)

    def job(self, plan: Plan, code: Path, executor: str = "slurm"):
        res = self.resources(plan)
        return J.TrainJob(str(code), os.getcwd(), res.gpus_per_node if executor == "slurm" else 0,
                          asdict(plan.sweep.launch), grace_s=max(10.0, res.signal_delay_s - 15.0))

    def label(self, t: Target) -> str:
        return t.key

    def announce(self, plan: Plan, targets: list[Target]) -> str:
        return ""

    def submitted_line(self, group: list[Target], job_id: str, after: list[str]) -> str:
        what = f"{len(group)} DPO run(s) as array job {job_id}" if self.arrays else f"{group[0].key} as job {job_id}"
        return f"submitted {what}" + (f" (after {', '.join(after)})" if after else "")

    def finished_line(self, t: Target, result) -> str:
        pruned = (result or {}).get("pruned")
        if pruned:
            return f"{t.key} pruned at step {pruned.get('step')}: {pruned.get('reason')}"
        evaluation = (result or {}).get("final_eval") or {}
        summary = [f"eval loss {evaluation['loss']:.4f}"] if "loss" in evaluation else []
        summary += [f"accuracy {evaluation['rewards/accuracies']:.3f}"] if "rewards/accuracies" in evaluation else []
        return f"{t.key} done" + (": " + ", ".join(summary) if summary else "")

    def status_row(self, plan: Plan, t: Target) -> dict:
        row = {"run": t.key, "job": t.job_id or "-", "state": plan.states.get(t.key, "-")}
        if self.name == "reference":
            return {**row, "status": "-", "step": "-", "eval_loss": "-", "accuracy": "-", "margin": "-",
                    "checkpoint": "-", "note": "-"}
        out = Path(t.config.output_dir)
        train, evaluation = last_rows(out / "metrics.jsonl")
        checkpoints = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
        info = J.read_json(out / "run.json")
        pruned = info.get("pruned") or {}
        return {**row, "status": info.get("status", "-"),
                "step": f"{train.get('step', 0)}/{t.config.train.max_steps}",
                "eval_loss": _fmt(evaluation.get("loss")), "accuracy": _fmt(evaluation.get("rewards/accuracies")),
                "margin": _fmt(evaluation.get("rewards/margins")),
                "checkpoint": "final" if (out / "final").is_dir() else (checkpoints[-1].name if checkpoints else "-"),
                "note": f"pruned: {pruned.get('reason', '?')}" if info.get("status") == "pruned" else "-"}


class Generation(Stage):
    """generate.py for the SFT model and every DPO run's final/ (and with generate.base the model SFT started from),
    into <sweep>/generations/<name>.jsonl."""
    name = "generate"

    def plan(self, plan: Plan) -> list[Target]:
        sweep, out = plan.sweep, plan.out
        heldout = f"heldout:{plan.heldout()[0]}"
        prompts = [heldout if p == "heldout" else p for p in sweep.generate.prompts]
        templates = {j.config.tokenize.chat_template for j in plan.jobs if j.kind in ("sft", "dpo")}
        if len(templates) > 1:
            raise UserInputError(f"{plan.file}: runs use different tokenize.chat_template values {sorted(templates)}: "
                                 f"their answers would not be comparable")
        by_key = {t.key: t for t in plan.targets}
        models = [("sft", sweep.sft.path or str(out / "sft" / "final"), by_key.get("sft"))]
        sft_jobs = [j for j in plan.jobs if j.kind == "sft"]
        if sweep.generate.base and sft_jobs:  # the model SFT started from, for the answer table only
            models.insert(0, ("base", sft_jobs[0].config.model.path, None))
        models += [(t.key, str(out / t.key / "final"), t) for t in plan.targets if t.stage == "dpo"]
        targets = []
        for name, model, trainer in models:
            answers = out / "generations" / f"{name}.jsonl"
            args = generate_args(sweep, plan.file, model, answers, name, prompts, next(iter(templates)))
            spec = {"key": f"generate/{name}", "stage": self.name, "script": "generate.py", "model": model,
                    "argv": to_argv(args), "out": str(answers), "made_by_sweep": trainer is not None,
                    "marker": str(answers.with_suffix(".done.json"))}
            targets.append(Target(self.name, spec["key"], name, answers, spec, [trainer] if trainer else []))
        return targets

    def marker(self, t: Target) -> dict:
        return J.generation_marker(t.spec["argv"], t.spec["model"])

    def done_detail(self, t: Target) -> str:
        return f"{J._lines(t.out)} answers written, same model and settings"

    def resources(self, plan: Plan):
        return J.resources(plan.sweep.resources("generate"), nodes=1)

    def label(self, t: Target) -> str:
        return f"generation for {t.name}"

    def announce(self, plan: Plan, targets: list[Target]) -> str:
        return f"sweep {plan.sweep.name}: answers for {len(targets)} model(s) in {plan.out / 'generations'}/"

    def submitted_line(self, group: list[Target], job_id: str, after: list[str]) -> str:
        return f"submitted generation for {len(group)} model(s) as array job {job_id}" + \
            (f" (after training jobs {', '.join(after)} end)" if after else "")

    def finished_line(self, t: Target, result) -> str:
        return f"{t.name}: {result['answers']} answers in {t.out}"

    def status_row(self, plan: Plan, t: Target) -> dict:
        return {"model": t.name, "job": t.job_id or "-", "state": plan.states.get(t.key, "-"),
                "answers": J._lines(t.out), "done": "yes" if t.state == "completed" else "no", "file": t.out}


class Judging(Stage):
    """judge.py: the judge's calibration on human-labelled pairs once, then every DPO run's answers against SFT's,
    into <sweep>/judgments/<name>.jsonl with its summary beside it."""
    name = "judge"

    def plan(self, plan: Plan) -> list[Target]:
        sweep, folder = plan.sweep, plan.out / "judgments"
        heldout = f"heldout:{plan.heldout()[0]}"
        calibrate = [heldout if c == "heldout" else labelled_file(c) if c.startswith("pairs:") else c
                     for c in sweep.judge.calibrate]
        targets, calibration = [], None
        if calibrate:
            out = folder / "calibration.jsonl"
            args = judge_args(sweep, plan.file, out, calibrate=calibrate)
            files = [pairs_file(c)[0] for c in calibrate if c.startswith("pairs:")]  # a changed file: judged again
            calibration = Target(self.name, "judge/calibration", "calibration", out, self._spec("judge/calibration",
                                                                                                args, files), [])
            targets.append(calibration)
        answers = {t.name: t for t in plan.stage("generate")}
        sft = answers["sft"]
        for name, t in answers.items():
            if name == "sft" or (name == "base" and sweep.generate.base):  # the base model's answers are not judged
                continue
            out = folder / f"{name}.jsonl"
            extra = {"calibration": str(summary_path(calibration.out))} if calibration else {}
            args = judge_args(sweep, plan.file, out, candidate=str(t.out), baseline=str(sft.out), **extra)
            inputs = [t.out, sft.out] + ([summary_path(calibration.out)] if calibration else [])
            targets.append(Target(self.name, f"judge/{name}", name, out, self._spec(f"judge/{name}", args, inputs),
                                  [t, sft] + ([calibration] if calibration else [])))
        return targets

    def _spec(self, key: str, args, inputs: list) -> dict:
        return {"key": key, "stage": self.name, "script": "judge.py", "argv": to_argv(args), "out": args.out,
                "inputs": [str(p) for p in inputs], "marker": str(Path(args.out).with_suffix(".done.json"))}

    def done(self, plan: Plan, t: Target) -> str | None:
        return super().done(plan, t) if summary_path(t.out).is_file() else None

    def marker(self, t: Target) -> dict:
        return J.judging_marker(t.spec["argv"], t.spec["inputs"])

    def done_detail(self, t: Target) -> str:
        return f"{J.read_json(summary_path(t.out)).get('n', 'all')} pairs judged, same answers and settings"

    def resources(self, plan: Plan):
        return J.resources(plan.sweep.resources("judge"), nodes=1)

    def label(self, t: Target) -> str:
        return f"judging {t.name}"

    def announce(self, plan: Plan, targets: list[Target]) -> str:
        return f"sweep {plan.sweep.name}: judge {', '.join(plan.sweep.judge.judge_model)} on {len(targets)} target(s) in " \
               f"{plan.out / 'judgments'}/"

    def submitted_line(self, group: list[Target], job_id: str, after: list[str]) -> str:
        return f"submitted judging of {len(group)} target(s) as array job {job_id}" + \
            (f" (after jobs {', '.join(after)} end)" if after else "")

    def finished_line(self, t: Target, result) -> str:
        return f"{t.name}: {judged_line(t.out)}"

    def status_row(self, plan: Plan, t: Target) -> dict:
        s = J.read_json(summary_path(t.out))
        cal = s.get("calibration") or {}
        ci = s.get("win_rate_ci") or cal.get("agreement_ci") or [None, None]
        return {"target": t.name, "job": t.job_id or "-", "state": plan.states.get(t.key, "-"),
                "done": "yes" if t.state == "completed" else "no", "win_rate": _fmt(s.get("win_rate")),
                "ci_low": _fmt(ci[0]), "ci_high": _fmt(ci[1]), "errors": s.get("errors", "-"),
                "agreement": _fmt(cal.get("agreement")), "file": t.out}


def labelled_file(spec: str) -> str:
    """pairs:FILE[:mapping] with FILE made absolute from where the sweep is launched (the jobs run elsewhere)."""
    path, mapping = pairs_file(spec)
    return f"pairs:{Path(path).expanduser().resolve()}" + (f":{mapping}" if mapping else "")


def judged_line(out: Path) -> str:
    """A judge summary's headline: win rate and CI, or the calibration agreement."""
    s = J.read_json(summary_path(out))
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    if "win_rate" in s:
        ci = s.get("win_rate_ci") or [None, None]
        return (f"win rate {pct(s['win_rate'])} [{pct(ci[0])}, {pct(ci[1])}] over {s['n']} pairs "
                f"({s['errors']} errors)")
    cal = s.get("calibration") or {}
    ci = cal.get("agreement_ci") or [None, None]
    return f"agreement with human labels {pct(cal.get('agreement'))} [{pct(ci[0])}, {pct(ci[1])}] on {cal.get('pairs', 0)} pairs"


class Analysis(Stage):
    """analyze_sweep.py over the sweep folder, writing the report (report/<name>/ or the sweep's report:). It waits
    while any job of the sweep is queued or running; it is done while its marker matches the sweep's files."""
    name = "analyze"
    arrays = False

    def plan(self, plan: Plan) -> list[Target]:
        report = plan.sweep.report_folder
        argv = ["--sweep", str(plan.out), "--out", str(report)]
        spec = {"key": "analyze", "stage": self.name, "script": "analyze_sweep.py", "argv": argv, "out": str(report),
                "sweep": str(plan.out), "marker": str(plan.out / J.ANALYSIS_MARKER)}
        return [Target(self.name, "analyze", "report", report, spec)]

    def classify(self, plan: Plan, targets: list[Target], launching: set) -> None:
        (t,) = targets
        t.job_id = plan.record["jobs"].get(t.key, {}).get("job_id", "")
        active = [plan.record["jobs"][k] for k, s in plan.states.items() if s in ACTIVE_STATES and k != t.key]
        busy = sorted({r["job_id"] for r in active})
        t.deps = []  # what it waits on is every job of the sweep, by job id: after()
        t.spec["after"] = sorted({r["job_id"].split("_")[0] for r in active if r.get("executor") == "slurm"})
        if plan.states.get(t.key) in ACTIVE_STATES:
            t.state, t.detail = "active", f"job {t.job_id} is {plan.states[t.key]}"
        elif busy:  # whatever the marker says, what it reads is about to change
            t.state, t.detail = "waiting", f"after jobs {', '.join(busy)} end"
        elif J.read_json(Path(t.spec["marker"])) == J.analysis_marker(t.spec["argv"], plan.out) and \
                (t.out / "README.md").is_file():
            t.state, t.detail = "completed", f"{t.out}/README.md is made from the sweep's current files"
        else:
            t.state, t.detail = "submit", "every job of the sweep has ended"

    def resources(self, plan: Plan):  # one CPU: not the GPU nodes' features or gres
        return J.resources(plan.sweep.resources(), nodes=1, gpus_per_node=0, cpus_per_task=1, mem_gb=4, timeout_min=30,
                           constraint=None, additional={})

    def label(self, t: Target) -> str:
        return "the analysis"

    def announce(self, plan: Plan, targets: list[Target]) -> str:
        return f"sweep {plan.sweep.name}: report in {targets[0].out}/"

    def submitted_line(self, group: list[Target], job_id: str, after: list[str]) -> str:
        return f"submitted the analysis as job {job_id}" + (f" (after jobs {', '.join(after)} end)" if after else "")

    def finished_line(self, t: Target, result) -> str:
        return f"report: {t.out}/README.md"


STAGES = {"sft": Training("sft"), "reference": Training("reference"), "dpo": Training("dpo"),
          "generate": Generation(), "judge": Judging(), "analyze": Analysis()}


# ---------------------------------------------------------------- --status


TRAINING_HEADERS = {"run": "run", "job": "job", "state": "state", "status": "run.json", "step": "step",
                    "eval_loss": "eval loss", "accuracy": "accuracy", "margin": "margin", "checkpoint": "checkpoint",
                    "note": "note"}


def cost_status(plan: Plan) -> str:
    """--status's last line: what the sweep's jobs used so far (costs.py) and an estimate of what is left."""
    remaining = {name: sum(t.state != "completed" for t in plan.stage(name)) for name in ORDER}
    return cost_line(job_costs(plan.out), remaining)


def status_table(plan: Plan, names) -> tuple[list[dict], dict]:
    """(rows, headers) of the --status table of one stage, or of the training stages together."""
    rows = [STAGES[t.stage].status_row(plan, t) for n in names for t in plan.stage(n)]
    if any(n in TRAINING for n in names):
        return rows, TRAINING_HEADERS
    return rows, {k: k for k in rows[0]} if rows else {}


def print_table(rows: list[dict], headers: dict, say=print) -> None:
    if not rows:
        return
    widths = {k: max(len(h), *(len(str(r[k])) for r in rows)) for k, h in headers.items()}
    say("  ".join(h.ljust(widths[k]) for k, h in headers.items()))
    for r in rows:
        say("  ".join(str(r[k]).ljust(widths[k]) for k in headers))
