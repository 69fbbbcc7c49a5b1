"""Launch a DPO sweep through submitit: the SFT baseline, the reference log-probs once, then one job array of DPO runs.

    python slurm/sweep.py --config configs/sweep_default.yaml                   # submit to Slurm
    python slurm/sweep.py --config configs/sweep_tiny.yaml --executor local     # same sweep, local processes
    python slurm/sweep.py --config configs/sweep_tiny.yaml --executor debug     # same sweep, in this process
    python slurm/sweep.py --config configs/sweep_default.yaml --dry-run         # print the plan, submit nothing
    python slurm/sweep.py --config configs/sweep_default.yaml --status          # where every run stands
    python slurm/sweep.py --config configs/sweep_default.yaml --cancel          # cancel the sweep's jobs
    python slurm/sweep.py --config configs/sweep_default.yaml slurm.partition=gpu grid.loss.beta=[0.05,0.1]
    python slurm/sweep.py --config configs/sweep_default.yaml --generate | --judge | --analyze   # the later stages
    python pipeline.py --config configs/sweep_default.yaml                       # every stage, one command

The sweep YAML names a base training config, overrides for every run, a grid (any training config key) and Slurm
resources. Runs get readable names from the grid (`beta0.1_seed0`) and write to <root>/<name>/<run>/; the SFT
baseline writes to <root>/<name>/sft/ and the shared reference cache lives in <root>/<name>/ref_cache/.

Stages, chained with Slurm dependencies (afterok, and dependants are cancelled if a stage fails):
  1. SFT baseline, unless it finished already (same resolved config) or sft.path names a model;
  2. `train_dpo.py --precompute-ref`, once per distinct (reference, data, tokenisation);
  3. the DPO runs as one job array (capped by slurm.array_parallelism).
Every job runs `accelerate launch` (one process per GPU, or launch.cpu_processes on CPU; multi-node through
submitit's srun, one task per node) on a snapshot of the code taken at submission, from resolved config files
written to <root>/<name>/configs/. Jobs are submitit Checkpointables: on Slurm's pre-timeout signal (USR2) or a
preemption the run saves a checkpoint at the next step boundary, the job requeues itself and resumes from it.

Running the launcher again submits only what is missing or failed: a run is finished when its run.json says
completed for the same resolved config, and a run whose job is still pending or running is left alone.
With --executor local or debug the launcher runs the stages one after another and waits.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import submitit  # noqa: E402
import yaml  # noqa: E402

from config import (Config, ConfigError, UserInputError, _require, load_config, read_yaml, to_dict,  # noqa: E402
                    to_yaml)
from jsonl import read_jsonl  # noqa: E402

if __name__ != "__main__":  # imported (tests): jobs must still unpickle where this folder is not importable
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

LAUNCHER_KEYS = ("output_dir", "loss.name", "loss.ref_cache_dir", "train.resume")  # set by the launcher for every run
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
PARSE_LOCK = threading.Lock()  # redirect_stderr swaps the process-wide sys.stderr: one parse at a time
SHORT_NAMES = {"loss.type": "", "loss.label_smoothing": "ls"}  # otherwise a key's last part: beta, seed, lr


# ---------------------------------------------------------------- the sweep file


@dataclass
class SlurmResources:
    partition: str | None = None
    """Slurm partition (sbatch --partition); none: the cluster's default."""
    account: str | None = None
    """Account to charge (--account)."""
    qos: str | None = None
    """Quality of service (--qos)."""
    constraint: str | None = None
    """Node features, e.g. a100|h100 (--constraint)."""
    nodes: int = 1
    """Nodes per run; above 1 each node runs accelerate launch through srun (one task per node)."""
    gpus_per_node: int = 0
    """GPUs per node, one training process each; 0 trains on CPU with launch.cpu_processes processes."""
    cpus_per_task: int = 2
    """CPU cores per node (the one task per node)."""
    mem_gb: float = 8
    """Memory per node in GB (--mem)."""
    timeout_min: int = 60
    """Time limit per job; a run that hits it checkpoints, requeues and resumes."""
    array_parallelism: int = 64
    """At most this many array tasks run at once (--array=...%N)."""
    signal_delay_s: int = 120
    """Slurm sends USR2 this long before the time limit (it may come up to 60 s early): time to checkpoint."""
    max_num_timeout: int = 20
    """Requeues after hitting the time limit before a run gives up (preemptions do not count)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before the job, e.g. `module load cuda/12.4`."""
    additional: dict[str, str] = field(default_factory=dict)
    """Any other sbatch option, without dashes: {exclude: 'node[01-02]', mail_type: END}."""

    def __post_init__(self):
        for name in ("nodes", "cpus_per_task", "timeout_min", "array_parallelism"):
            _require(getattr(self, name) >= 1, f"slurm.{name}", "must be at least 1")
        _require(self.gpus_per_node >= 0, "slurm.gpus_per_node", "must be 0 or more")
        _require(self.mem_gb > 0, "slurm.mem_gb", "must be positive")
        _require(self.signal_delay_s >= 0, "slurm.signal_delay_s", "must be 0 or more")


@dataclass
class LaunchConfig:
    cpu_processes: int = 1
    """Training processes per node when slurm.gpus_per_node is 0 (gloo on CPU)."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON for accelerate --use_deepspeed (e.g. configs/accelerate/zero2_cpu.json); none: DDP."""
    local_parallelism: int = 1
    """Runs at once with --executor local (each uses all the cores it finds)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the training processes, e.g. {NCCL_DEBUG: WARN}."""

    def __post_init__(self):
        _require(self.cpu_processes >= 1, "launch.cpu_processes", "must be at least 1")
        for key, value in self.env.items():
            _require(isinstance(value, (str, int, float)) and not isinstance(value, bool), f"launch.env.{key}",
                     f"expected a string or number; got {value!r}")
        self.env = {str(k): str(v) for k, v in self.env.items()}
        _require(self.local_parallelism >= 1, "launch.local_parallelism", "must be at least 1")


@dataclass
class SftStage:
    path: str | None = None
    """An existing SFT model (folder or hub id): skip the SFT stage and start every DPO run from it."""
    overrides: dict[str, typing.Any] = field(default_factory=dict)
    """Training config keys for the SFT run only, e.g. {train.lr: 1.0e-5}."""
    slurm: dict[str, typing.Any] = field(default_factory=dict)
    """Slurm resources that differ for the SFT job, e.g. {timeout_min: 240}."""


@dataclass
class DpoStage:
    overrides: dict[str, typing.Any] = field(default_factory=dict)
    """Training config keys for every DPO run (below the grid)."""


@dataclass
class ReferenceStage:
    slurm: dict[str, typing.Any] = field(default_factory=dict)
    """Slurm resources that differ for the reference log-prob job."""


@dataclass
class GenerateStage:
    prompts: list[str] = field(default_factory=lambda: ["heldout"])
    """generate.py --prompts for every model: heldout (the pairs the sweep's runs held out), mt_bench, alpaca_eval, a
    .jsonl file."""
    engine: str = "auto"
    """auto (vLLM where it imports) | vllm | hf."""
    max_new_tokens: int = 256
    """Answer length limit in tokens."""
    temperature: float = 0.0
    """0 = greedy, the evaluation default."""
    top_p: float = 1.0
    """Nucleus sampling mass (with temperature > 0)."""
    n: int = 1
    """Answers per prompt (needs temperature > 0 when above 1)."""
    seed: int = 0
    """Sampling seed."""
    limit: int = 0
    """Answer a seeded subset of this many prompts of each set (0 = all)."""
    args: list[str] = field(default_factory=list)
    """Further generate.py flags, e.g. [--turns, both, --dtype, bfloat16]."""
    slurm: dict[str, typing.Any] = field(default_factory=dict)
    """Slurm resources that differ for generation jobs, e.g. {gpus_per_node: 1, timeout_min: 120} (one node each)."""


@dataclass
class JudgeStage:
    judge_model: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    """judge.py --judge-model: checkpoint folder or hub id (its tokenizer is used with every engine)."""
    engine: str = "auto"
    """auto (openai with --base-url in args, else vLLM where it imports) | vllm | hf | openai."""
    mode: str = "choice"
    """choice (the judge's probabilities of [[A]]/[[B]]/[[C]]) | generate (explanation, then the last [[X]])."""
    order: str = "random"
    """random (one seeded position draw per pair) | both (each pair in both orders; disagreement = tie)."""
    template: str = "hh-v1"
    """judge.py --template."""
    seed: int = 0
    """Position draws, --limit subsets, bootstrap."""
    limit: int = 0
    """Judge a seeded subset of this many pairs per DPO run (0 = all)."""
    calibrate: list[str] = field(default_factory=lambda: ["llmbar:Natural", "llmbar:Adversarial", "heldout"])
    """Human-labelled sets the judge is measured on once per sweep ([] = none); heldout = the sweep's held-out pairs."""
    calibration_limit: int = 0
    """A seeded subset of this many pairs per calibration set (0 = all)."""
    args: list[str] = field(default_factory=list)
    """Further judge.py flags, e.g. [--base-url, http://judge-node:8000/v1] or [--tensor-parallel-size, 4]."""
    slurm: dict[str, typing.Any] = field(default_factory=dict)
    """Slurm resources that differ for judging jobs, e.g. {gpus_per_node: 1} (one node each)."""


@dataclass
class Sweep:
    name: str = ""
    """Sweep name: outputs go to <root>/<name>/."""
    base: str = ""
    """The training config every run starts from (configs/*.yaml)."""
    root: str = "logs"
    """Folder holding sweeps; on a cluster it must be shared storage that every node sees."""
    report: str = ""
    """Folder the analysis writes the report to; empty: report/<name>."""
    overrides: dict[str, typing.Any] = field(default_factory=dict)
    """Training config keys for every stage (SFT, reference, DPO)."""
    grid: dict[str, list] = field(default_factory=dict)
    """Training config key -> values; the sweep runs every combination."""
    sft: SftStage = field(default_factory=SftStage)
    dpo: DpoStage = field(default_factory=DpoStage)
    reference: ReferenceStage = field(default_factory=ReferenceStage)
    generate: GenerateStage = field(default_factory=GenerateStage)
    judge: JudgeStage = field(default_factory=JudgeStage)
    slurm: SlurmResources = field(default_factory=SlurmResources)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self):
        _require(bool(re.fullmatch(r"[A-Za-z0-9._-]+", self.name or "")), "name",
                 f"must be a non-empty folder name of letters, digits, . _ -; got {self.name!r}")
        _require(bool(self.base), "base", "must name a training config, e.g. configs/default.yaml")
        _require(bool(self.grid), "grid", "must give at least one key with values, e.g. {loss.beta: [0.1, 0.3]}")
        for key, values in self.grid.items():
            _require(isinstance(values, list) and len(values) > 0, f"grid.{key}", f"expected a non-empty list; got {values!r}")
            _require(len(set(map(_text, values))) == len(values), f"grid.{key}", f"repeats a value: {values}")
        for section, keys in (("overrides", self.overrides), ("sft.overrides", self.sft.overrides),
                              ("dpo.overrides", self.dpo.overrides), ("grid", self.grid)):
            for key in keys:
                _require(key not in LAUNCHER_KEYS, f"{section}.{key}", "is set by the launcher for each run")
        for section, stage in (("sft.slurm", self.sft.slurm), ("reference.slurm", self.reference.slurm),
                               ("generate.slurm", self.generate.slurm), ("judge.slurm", self.judge.slurm)):
            _build(SlurmResources, {**{k: v for k, v in dataclasses.asdict(self.slurm).items()}, **stage}, section + ".")
        for section, keys in (("dpo.overrides", self.dpo.overrides), ("grid", self.grid)):
            _require("model.path" not in keys, f"{section}.model.path",
                     "DPO runs start from the SFT model: set sft.path to start them from another model")


def _build(cls, raw, prefix: str = ""):
    """Nested dataclass from a YAML mapping; unknown keys and wrong types name the key."""
    _require(isinstance(raw, dict), prefix.rstrip(".") or "sweep", f"expected a mapping; got {raw!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"{prefix}{key}: unknown sweep key (known here: {known})")
        hint, name = hints[key], prefix + key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, name + ".")
        elif typing.get_origin(hint) is dict or typing.get_origin(hint) is list:
            expected = dict if typing.get_origin(hint) is dict else list
            _require(isinstance(value, expected) or value is None, name, f"expected a {expected.__name__}; got {value!r}")
            kwargs[key] = value if value is not None else expected()
        else:
            types = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
            if value is None and type(None) in typing.get_args(hint):
                kwargs[key] = None
            elif float in types and isinstance(value, int) and not isinstance(value, bool):
                kwargs[key] = float(value)
            else:
                _require(isinstance(value, tuple(types)) and not isinstance(value, bool) or bool in types, name,
                         f"expected {' or '.join(t.__name__ for t in types)}; got {value!r}")
                kwargs[key] = value
    return cls(**kwargs)


def sweep_override(raw: dict, override: str) -> None:
    """`slurm.partition=gpu`, `grid.loss.beta=[0.1,0.3]`, `overrides.train.max_steps=8`, `sft.overrides.train.lr=1e-5`:
    the first part picks the sweep section; under grid/overrides the rest is one training config key."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key=value")
    key, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {override!r}: the value is not valid YAML (quote lists: 'grid.loss.beta=[0.1,0.3]')") from None
    parts = key.strip().split(".")
    depth = len(parts) - 1  # slurm.partition: a nested sweep key
    for section in ("grid", "overrides", "sft.overrides", "dpo.overrides", "sft.slurm", "reference.slurm", "generate.slurm",
                    "judge.slurm"):
        if key.startswith(section + "."):  # the rest is one key of that mapping (a dotted training key)
            depth = section.count(".") + 1
    node = raw
    for part in parts[:depth]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a mapping in the sweep file")
    node[".".join(parts[depth:])] = value


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    raw = read_yaml(path)  # missing file, bad YAML (with its line), not UTF-8, not a mapping: named errors
    try:
        for override in overrides:
            sweep_override(raw, override)
        return _build(Sweep, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# ---------------------------------------------------------------- the plan


@dataclass
class Job:
    """One stage job: the SFT run, a reference precompute, or one DPO run of the array."""
    key: str              # sft | reference-<n> | <run name>
    kind: str             # sft | reference | dpo
    config: Config
    config_path: Path
    state: str = ""       # completed | active | submit
    detail: str = ""
    job_id: str = ""


def _text(value) -> str:
    """Override text for a YAML value (strings as typed, so `no` stays the string 'no')."""
    return value if isinstance(value, str) else json.dumps(value)


def _value_text(value) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list):
        text = "-".join(map(str, value))
    else:
        text = str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def grid_runs(sweep: Sweep) -> list[tuple[str, list[str]]]:
    """Every grid combination as (readable run name, overrides), in file order: beta0.1_seed0, beta0.1_seed1, ...
    A key's name part is its last component (or SHORT_NAMES); two keys sharing one use their full dotted names."""
    keys = list(sweep.grid)
    shorts = [SHORT_NAMES.get(k, k.split(".")[-1]) for k in keys]
    prefixes = [k.replace(".", "-") if short and shorts.count(short) > 1 else short for k, short in zip(keys, shorts)]
    runs = []
    for values in itertools.product(*(sweep.grid[k] for k in keys)):
        name = "_".join(prefix + _value_text(v) for prefix, v in zip(prefixes, values))
        runs.append((name, [f"{k}={_text(v)}" for k, v in zip(keys, values)]))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names) or "sft" in names:
        raise ConfigError(f"grid values give clashing run names: {names}")
    return runs


def sweep_dir(sweep: Sweep) -> Path:
    return Path(sweep.root) / sweep.name


def needs_reference(cfg: Config) -> bool:
    return cfg.loss.name == "dpo" and cfg.loss.type != "simpo"


def reference_group(cfg: Config) -> str:
    """What the cached reference log-probs depend on; runs that agree on it share one precompute job."""
    d = to_dict(cfg)
    key = {"model": d["model"], "data": d["data"], "tokenize": d["tokenize"], "reference": d["loss"]["reference_path"],
           "mixed_precision": d["train"]["mixed_precision"], "cache": d["loss"]["ref_cache_dir"]}
    return json.dumps(key, sort_keys=True)


def build_plan(sweep: Sweep, sweep_file: str) -> list[Job]:
    """The resolved training config of every job: SFT (unless sft.path), references, DPO runs."""
    out = sweep_dir(sweep)
    common = [f"{k}={_text(v)}" for k, v in sweep.overrides.items()]

    def resolve(what: str, overrides: list[str]) -> Config:
        try:
            return load_config(sweep.base, overrides)
        except ConfigError as e:
            raise ConfigError(f"{sweep_file}: {what}: {e}") from None

    jobs = []
    if sweep.sft.path:
        policy = sweep.sft.path
        looks_local = policy.startswith((".", "/", "~")) or policy.count("/") > 1
        if looks_local and not Path(policy).expanduser().exists():
            raise ConfigError(f"{sweep_file}: sft.path: {policy} does not exist")
    else:
        cfg = resolve("sft", common + [f"{k}={_text(v)}" for k, v in sweep.sft.overrides.items()]
                      + ["loss.name=sft", f"output_dir={out / 'sft'}", "train.resume=auto"])
        jobs.append(Job("sft", "sft", cfg, out / "configs" / "sft.yaml"))
        policy = str(out / "sft" / "final")
    # a requeued or resubmitted run must continue from its checkpoint, whatever the base config says
    dpo_common = common + [f"{k}={_text(v)}" for k, v in sweep.dpo.overrides.items()] + ["loss.name=dpo", "train.resume=auto"]
    runs = []
    for name, grid_overrides in grid_runs(sweep):
        cfg = resolve(f"run {name}", dpo_common + grid_overrides + [
            f"model.path={policy}", f"output_dir={out / name}", f"loss.ref_cache_dir={out / 'ref_cache'}"])
        runs.append(Job(name, "dpo", cfg, out / "configs" / f"{name}.yaml"))
    groups: dict[str, Config] = {}
    for run in runs:
        if needs_reference(run.config):
            groups.setdefault(reference_group(run.config), run.config)
    for i, cfg in enumerate(groups.values()):
        jobs.append(Job(f"reference-{i}", "reference", cfg, out / "configs" / f"reference-{i}.yaml"))
    return jobs + runs


def flat(d: dict, prefix: str = "") -> dict:
    items = {}
    for k, v in d.items():
        items.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return items


def run_status(job: Job) -> tuple[str | None, str]:
    """(run.json status or None, why a run folder cannot be reused). A folder holding another config is an error."""
    out = Path(job.config.output_dir)
    run_json, saved = out / "run.json", out / "config.yaml"
    if not run_json.is_file():
        return None, ""
    if saved.is_file() and saved.read_text() != to_yaml(job.config):
        old, new = flat(yaml.safe_load(saved.read_text()) or {}), flat(to_dict(job.config))
        changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        return None, f"{out} holds a run of a different config ({'; '.join(changed[:4])})"
    try:
        return json.loads(run_json.read_text()).get("status"), ""
    except json.JSONDecodeError:
        return "unreadable", ""


# ---------------------------------------------------------------- job records and scheduler states


def read_record(out: Path) -> dict:
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
    """(job id, state) pairs from sacct/squeue; a scheduler that does not answer is an error, never 'not queued'
    (that would resubmit running jobs)."""
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


def classify(jobs: list[Job], record: dict, states: dict[str, str]) -> None:
    """Sets job.state: completed (nothing to do), active (its job is queued or running), or submit."""
    conflicts = []
    for job in jobs:
        job.job_id = record["jobs"].get(job.key, {}).get("job_id", "")
        state = states.get(job.key, "")
        if job.kind != "reference":
            status, conflict = run_status(job)
            if conflict:
                conflicts.append(conflict)
                continue
            if status == "completed":
                job.state, job.detail = "completed", "finished (run.json: completed, same config)"
                continue
        elif reference_cached(job) and not any(j.kind == "sft" and j.state != "completed" for j in jobs):
            job.state, job.detail = "completed", "reference log-probs already cached for this config and model"
            continue
        if state in ACTIVE_STATES:
            job.state, job.detail = "active", f"job {job.job_id} is {state}"
        else:
            job.state = "submit"
            job.detail = "new" if not job.job_id else f"job {job.job_id} ended {state or 'without a record'}"
    if conflicts:
        raise UserInputError("run folders hold other configs; delete them or give the sweep a new name:\n  "
                             + "\n  ".join(conflicts))
    dpo = [j for j in jobs if j.kind == "dpo"]
    for ref in (j for j in jobs if j.kind == "reference"):  # only worth running for runs that will be submitted
        group = reference_group(ref.config)
        if ref.state == "submit" and not any(r.state == "submit" and needs_reference(r.config)
                                             and reference_group(r.config) == group for r in dpo):
            ref.state, ref.detail = "completed", "not needed (its runs are finished or queued)"


# ---------------------------------------------------------------- code snapshot


def snapshot_code(out: Path) -> Path:
    """Copy the repository's source (git-tracked and untracked-but-not-ignored files) to <sweep>/code/<digest>/,
    so queued jobs run the code as it was at submission. Identical trees share one snapshot."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
        files = sorted({f for f in listed if f and (REPO / f).is_file()})
    except (OSError, subprocess.CalledProcessError):
        files = sorted(str(p.relative_to(REPO)) for pattern in ("*.py", "slurm/*", "configs/**/*")
                       for p in REPO.glob(pattern) if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.encode() + b"\0" + (REPO / f).read_bytes() + b"\0")
    target = out / "code" / digest.hexdigest()[:12]
    if not target.is_dir():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        for f in files:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, tmp / f)
        os.replace(tmp, target)
    return target.resolve()


# ---------------------------------------------------------------- the job


class TrainJob(submitit.helpers.Checkpointable):
    """`accelerate launch <code>/train_dpo.py --config <resolved>.yaml [--precompute-ref]` as a submitit job.

    submitit calls checkpoint() on Slurm's USR2 (the time limit is near, or `scancel --signal USR2` on preemption):
    it forwards the signal to the training processes, waits until they saved a checkpoint at a step boundary and
    exited, and returns the same call, which submitit requeues; the requeued job resumes from that checkpoint
    (train.resume=auto). Nothing here imports the project: the job runs only the code snapshot, in a subprocess.
    """

    def __init__(self, code_dir: str, workdir: str, gpus_per_node: int, launch: dict, grace_s: float):
        self.code_dir, self.workdir, self.gpus_per_node = code_dir, workdir, gpus_per_node
        self.launch, self.grace_s = launch, grace_s
        self._proc = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update(state, _proc=None)

    def command(self, spec: dict) -> tuple[list[str], dict]:
        try:
            env_info = submitit.JobEnvironment()
            nodes, node_rank, hosts = env_info.num_nodes, env_info.node, env_info.hostnames
        except RuntimeError:  # not inside a submitit job (a direct call)
            nodes, node_rank, hosts = 1, 0, ["127.0.0.1"]
        per_node = self.gpus_per_node or self.launch["cpu_processes"]
        # accelerate launch sets OMP_NUM_THREADS=1 unless told: give each process its share of the job's cores
        threads = max(1, int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1) // per_node)
        # every node derives the same port from the job id; array tasks have distinct job ids
        port = 20000 + int(os.environ.get("SLURM_JOB_ID", os.getpid())) % 20000
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(per_node * nodes),
               "--num_machines", str(nodes), "--machine_rank", str(node_rank),
               "--main_process_ip", hosts[0] if nodes > 1 else "127.0.0.1", "--main_process_port", str(port),
               "--mixed_precision", spec["mixed_precision"], "--dynamo_backend", "no", "--quiet",
               "--num_cpu_threads_per_process", str(threads)]
        # torchrun (several processes) would turn SIGTERM into killing the trainers 30 s later, mid-checkpoint;
        # the trainers handle SIGTERM/USR2 themselves and stop at a step boundary.
        env = {**os.environ, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGINT", **self.launch["env"]}
        if self.launch["deepspeed_config"]:
            cmd += ["--use_deepspeed", "--deepspeed_config_file", self.launch["deepspeed_config"]]
            if nodes > 1:  # accelerate's default multi-node DeepSpeed launcher is pdsh; under srun each node starts its own
                cmd += ["--deepspeed_multinode_launcher", "standard"]
            if not self.gpus_per_node:
                env["DS_ACCELERATOR"] = "cpu"
        else:
            if per_node * nodes > 1:
                cmd.append("--multi_gpu")
            if not self.gpus_per_node:
                env["ACCELERATE_USE_CPU"] = "1"
        cmd += [str(Path(self.code_dir) / "train_dpo.py"), "--config", spec["config"]]
        if spec["mode"] == "reference":
            cmd.append("--precompute-ref")
        return cmd, env

    def __call__(self, spec: dict) -> dict:
        cmd, env = self.command(spec)
        print("+ " + shlex.join(cmd), flush=True)
        # Its own session, so checkpoint() can signal the whole tree. The launcher processes ignore SIGTERM/USR2 and
        # so outlive the trainer, which restores the defaults at start and, once training, stops at a step boundary
        # after saving a checkpoint.
        try:
            self._proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, start_new_session=True,
                                          preexec_fn=_ignore_stop_signals)
            while self._proc.poll() is None:  # polled: a blocking wait() holds a lock that checkpoint() needs
                time.sleep(0.5)
        finally:
            self._stop_tree()
        code = self._proc.returncode
        if spec["mode"] == "reference":
            if code != 0:
                raise RuntimeError(f"reference log-probs for {spec['config']} failed (exit code {code})")
            Path(spec["marker"]).write_text(json.dumps(reference_marker(spec)))
            return {"mode": "reference", "config": spec["config"]}
        info = _read_json(Path(spec["output_dir"]) / "run.json")
        if code == 0 and info.get("status") == "completed":
            return {"mode": "train", "output_dir": spec["output_dir"], "steps": info.get("steps"),
                    "final_eval": info.get("final_eval")}
        if info.get("status") == "interrupted":
            time.sleep(30)  # a preemption's USR2 follows its SIGTERM: give submitit the chance to requeue
        raise RuntimeError(f"training {spec['output_dir']} ended with exit code {code}, run.json status "
                           f"{info.get('status')!r}: {info.get('error', 'see the job log')}")

    def checkpoint(self, spec: dict):
        proc = self._proc
        if proc is not None and proc.poll() is None:
            signal_tree(proc, signal.SIGUSR2)
            deadline = time.time() + self.grace_s
            while proc.poll() is None and time.time() < deadline:
                time.sleep(0.5)
            print(f"checkpoint: the training processes {'exited' if proc.poll() is not None else 'are still running'};"
                  f" requeueing", flush=True)
        fresh = TrainJob(self.code_dir, self.workdir, self.gpus_per_node, self.launch, self.grace_s)
        return submitit.helpers.DelayedSubmission(fresh, spec)

    def _stop_tree(self) -> None:
        stop_tree(self._proc)


def descendants(proc) -> list:
    import psutil

    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def signal_tree(proc, sig, tree: list | None = None) -> None:
    """Signal the job's process group and every process below it: torch's launcher starts each trainer of a
    multi-process run in a session of its own, out of reach of the group's signal."""
    import psutil

    tree = descendants(proc) if tree is None else tree  # first: a launcher the signal ends takes its children's link
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(sig)


def stop_tree(proc) -> None:
    """Leave no child process behind (an interrupted debug/local job, a requeue that timed out)."""
    if proc is None:
        return
    import psutil

    tree = descendants(proc) if proc.poll() is None else []  # a reaped launcher's PID may be someone else's now

    def running(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def alive() -> bool:
        proc.poll()  # reaped, or the group counts its own zombie as alive
        try:
            os.killpg(proc.pid, 0)
            return True
        except ProcessLookupError:
            return any(running(p) for p in tree)

    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 0)):
        with contextlib.suppress(psutil.NoSuchProcess):
            signal_tree(proc, sig, tree)
        deadline = time.time() + wait_s
        while alive() and time.time() < deadline:
            time.sleep(0.2)
        if not alive():
            return


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def model_stamp(path: str) -> str:
    """Names, sizes and mtimes of a model folder's files (a hub id stands for itself): a re-run SFT changes it."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return f"hub:{path}"
    return hashlib.sha256(json.dumps(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                            for p in folder.iterdir() if p.is_file())).encode()).hexdigest()[:16]


def reference_marker(spec: dict) -> dict:
    """Written next to a reference job's config when it succeeded; valid while config and reference model match."""
    return {"config_sha": hashlib.sha256(Path(spec["config"]).read_bytes()).hexdigest()[:16],
            "reference": model_stamp(spec["reference"])}


def reference_cached(job: Job) -> bool:
    marker = _read_json(job.config_path.with_suffix(".done"))
    return bool(marker) and job.config_path.is_file() and job.config_path.read_text().endswith(to_yaml(job.config)) \
        and marker == reference_marker(job_spec(job))


def job_spec(job: Job) -> dict:
    return {"key": job.key, "config": str(job.config_path.resolve()), "mode": "reference" if job.kind == "reference" else "train",
            "output_dir": job.config.output_dir, "mixed_precision": job.config.train.mixed_precision,
            "reference": job.config.loss.reference_path or job.config.model.path,
            "marker": str(job.config_path.resolve().with_suffix(".done"))}


# ---------------------------------------------------------------- submission


def make_executor(kind: str, out: Path, code: Path, sweep: Sweep, stage_slurm: dict, dependency: list[str] = (),
                  dependency_type: str = "afterok"):
    res = dataclasses.replace(sweep.slurm, **stage_slurm)
    executor = submitit.AutoExecutor(folder=out / "submitit", cluster=kind,  # max_num_timeout: constructor only (submitit 1.5)
                                     **({"slurm_max_num_timeout": res.max_num_timeout} if kind == "slurm" else {}))
    params = dict(timeout_min=res.timeout_min, cpus_per_task=res.cpus_per_task, mem_gb=res.mem_gb, tasks_per_node=1,
                  name=f"dpo-{sweep.name}")
    if kind == "slurm":
        extra = dict(res.additional)
        if dependency:  # a failed stage cancels its dependants instead of leaving them pending forever
            extra.update(dependency=f"{dependency_type}:" + ":".join(dependency), kill_on_invalid_dep="yes")
        params.update(nodes=res.nodes, gpus_per_node=res.gpus_per_node, slurm_partition=res.partition,
                      slurm_account=res.account, slurm_qos=res.qos, slurm_constraint=res.constraint,
                      slurm_signal_delay_s=res.signal_delay_s, slurm_setup=list(res.setup),
                      slurm_array_parallelism=res.array_parallelism, slurm_additional_parameters=extra)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    if kind == "local":  # time to checkpoint before the local controller kills a run at its time limit (AutoExecutor
        executor._executor.update_parameters(signal_delay_s=res.signal_delay_s)  # does not pass this one through)
    task = TrainJob(str(code), os.getcwd(), res.gpus_per_node if kind == "slurm" else 0,
                    dataclasses.asdict(sweep.launch), grace_s=max(10.0, res.signal_delay_s - 15.0))
    return executor, task


def submit_slurm(sweep: Sweep, jobs: list[Job], out: Path, code: Path, say, remember) -> None:
    """Submit SFT -> reference -> DPO array with afterok dependencies on whatever is still queued or running.
    remember(key, job_id) records each job the moment sbatch accepted it, so a later failure cannot orphan it."""
    submitted: dict[str, str] = {}
    waiting_on: dict[str, list[str]] = {"sft": [], "reference": [], "dpo": []}
    for job in jobs:
        if job.state == "active":
            waiting_on[job.kind].append(job.job_id)
    for stage, after in (("sft", []), ("reference", ["sft"])):
        for job in (j for j in jobs if j.kind == stage and j.state == "submit"):
            deps = [i for s in after for i in waiting_on[s]]
            executor, task = make_executor("slurm", out, code, sweep,
                                           sweep.sft.slurm if stage == "sft" else sweep.reference.slurm, deps)
            submitted[job.key] = executor.submit(task, job_spec(job)).job_id
            remember(job.key, submitted[job.key])
            waiting_on[stage].append(submitted[job.key])
            say(f"submitted {job.key} as job {submitted[job.key]}" + (f" (after {', '.join(deps)})" if deps else ""))
    runs = [j for j in jobs if j.kind == "dpo" and j.state == "submit"]
    if runs:
        deps = waiting_on["sft"] + waiting_on["reference"]
        executor, task = make_executor("slurm", out, code, sweep, {}, deps)
        array = executor.map_array(task, [job_spec(j) for j in runs])
        for job, handle in zip(runs, array):
            remember(job.key, handle.job_id)
        say(f"submitted {len(runs)} DPO run(s) as array job {array[0].job_id.split('_')[0]}"
            + (f" (after {', '.join(deps)})" if deps else ""))


def run_in_order(kind: str, sweep: Sweep, jobs: list[Job], out: Path, code: Path, record: dict, say) -> bool:
    """local/debug executors: no scheduler holds dependencies, so each stage waits for the one before."""
    executor, task = make_executor(kind, out, code, sweep, {})

    def start(job: Job):
        handle = executor.submit(task, job_spec(job))
        record["jobs"][job.key] = {"job_id": str(handle.job_id), "executor": kind, "submitted": _now()}
        write_record(out, record)
        say(f"started {job.key} ({kind} job {handle.job_id})")
        return handle

    def finish(job: Job, handle) -> bool:
        try:
            result = handle.result()
        except Exception as e:  # submitit's error holds the job's traceback; its last line names the failure
            say(f"{job.key} FAILED: {failure_line(e)}" + (f"; log: {handle.paths.stderr}" if kind == "local" else ""))
            return False
        evaluation = result.get("final_eval") or {}
        summary = [f"eval loss {evaluation['loss']:.4f}"] if "loss" in evaluation else []
        summary += [f"accuracy {evaluation['rewards/accuracies']:.3f}"] if "rewards/accuracies" in evaluation else []
        say(f"{job.key} done" + (": " + ", ".join(summary) if summary else ""))
        return True

    for stage in ("sft", "reference"):
        for job in (j for j in jobs if j.kind == stage and j.state == "submit"):
            if not finish(job, start(job)):
                return False
    pending, running, ok = [j for j in jobs if j.kind == "dpo" and j.state == "submit"], [], True
    width = sweep.launch.local_parallelism if kind == "local" else 1
    while pending or running:
        while pending and len(running) < width:
            job = pending.pop(0)
            running.append((job, start(job)))
        while kind == "local" and not any(handle.done() for _, handle in running):
            time.sleep(1)
        for job, handle in [(j, h) for j, h in running if kind == "debug" or h.done()]:
            ok = finish(job, handle) and ok
            running.remove((job, handle))
    return ok


def failure_line(error: Exception) -> str:
    """The line of a failed job's error that says what went wrong (submitit's message ends with log paths)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception): ", line)), lines[-1])


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


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


# ---------------------------------------------------------------- status and cancel


def last_rows(path: Path) -> tuple[dict, dict]:
    rows = read_jsonl(path) if path.is_file() else []
    train = next((r for r in reversed(rows) if r.get("split") == "train"), {})
    evaluation = next((r for r in reversed(rows) if r.get("split") == "eval"), {})
    return train, evaluation


def status_rows(jobs: list[Job], record: dict, states: dict[str, str]) -> list[dict]:
    rows = []
    for job in jobs:
        out = Path(job.config.output_dir)
        rec = record["jobs"].get(job.key, {})
        row = {"run": job.key, "job": rec.get("job_id", "-"), "state": states.get(job.key, "-")}
        if job.kind == "reference":
            row.update(step="-", status="-", eval_loss="-", accuracy="-", margin="-", checkpoint="-")
        else:
            info = _read_json(out / "run.json")
            train, evaluation = last_rows(out / "metrics.jsonl")
            checkpoints = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
            row.update(step=f"{train.get('step', 0)}/{job.config.train.max_steps}", status=info.get("status", "-"),
                       eval_loss=_fmt(evaluation.get("loss")), accuracy=_fmt(evaluation.get("rewards/accuracies")),
                       margin=_fmt(evaluation.get("rewards/margins")),
                       checkpoint="final" if (out / "final").is_dir() else (checkpoints[-1].name if checkpoints else "-"))
        rows.append(row)
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


STATUS_HEADERS = {"run": "run", "job": "job", "state": "state", "status": "run.json", "step": "step",
                  "eval_loss": "eval loss", "accuracy": "accuracy", "margin": "margin", "checkpoint": "checkpoint"}


def print_table(rows: list[dict], headers: dict[str, str] = STATUS_HEADERS) -> None:
    widths = {k: max(len(h), *(len(str(r[k])) for r in rows)) for k, h in headers.items()}
    print("  ".join(h.ljust(widths[k]) for k, h in headers.items()))
    for r in rows:
        print("  ".join(str(r[k]).ljust(widths[k]) for k in headers))


def cancel(record: dict, states: dict[str, str], say) -> int:
    slurm_ids = [r["job_id"] for k, r in record["jobs"].items()
                 if r.get("executor") == "slurm" and states.get(k) in ACTIVE_STATES]
    if slurm_ids:
        subprocess.run(["scancel", *slurm_ids], check=False)
        say(f"cancelled Slurm job(s) {', '.join(slurm_ids)}")
    local = [r["job_id"] for k, r in record["jobs"].items() if r.get("executor") == "local" and states.get(k) == "RUNNING"]
    for pid in local:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGINT)  # submitit's local controller stops its tasks on SIGINT
    if local:
        say(f"interrupted local job(s) {', '.join(local)}")
    if not slurm_ids and not local:
        say("nothing queued or running")
    return len(slurm_ids) + len(local)


# ---------------------------------------------------------------- generation stage (--generate)


@dataclass
class GenTarget:
    """generate.py for one model of the sweep: the SFT model or a DPO run's final/."""
    key: str              # generate/sft | generate/<run name>
    name: str             # sft | <run name>
    model: str
    out: Path             # <sweep>/generations/<name>.jsonl
    argv: list
    trainer: Job | None   # the training job that makes the model (None: sft.path names it)
    state: str = ""       # completed | active | submit | waiting (training still queued/running) | blocked
    detail: str = ""
    job_id: str = ""


def heldout_config(jobs: list[Job], out: Path, sweep_file: str, write: bool = False) -> Path:
    """One training config that names the held-out pairs of every run: SFT and DPO runs must agree on them (same
    data and data.split_seed), so every model answers the same prompts, none of which it was trained on."""
    training = [j for j in jobs if j.kind in ("sft", "dpo")]
    data = {j.key: json.dumps(to_dict(j.config)["data"], sort_keys=True) for j in training}
    differing = [k for k in data if data[k] != data[training[0].key]]
    if differing:
        raise ConfigError(f"{sweep_file}: generate.prompts: heldout: {training[0].key} and {differing[0]} hold out "
                          f"different pairs (their data.* keys differ); name another prompt set or heldout:<config>")
    path = out / "configs" / "heldout.yaml"
    text = f"# written by slurm/sweep.py: the data (and held-out split) of every run in {sweep_file}\n" + \
        to_yaml(next(j for j in training if j.kind == "dpo").config)
    if write and (not path.is_file() or path.read_text() != text):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path.resolve()


def generation_plan(sweep: Sweep, jobs: list[Job], sweep_file: str) -> list[GenTarget]:
    """generate.py arguments for the SFT model and every DPO run, checked by generate.py's own parser."""
    import generate

    g, out = sweep.generate, sweep_dir(sweep)
    prompts = [f"heldout:{heldout_config(jobs, out, sweep_file)}" if p == "heldout" else p for p in g.prompts]
    templates = {j.config.tokenize.chat_template for j in jobs if j.kind in ("sft", "dpo")}
    if len(templates) > 1:
        raise ConfigError(f"{sweep_file}: runs use different tokenize.chat_template values {sorted(templates)}: their "
                          f"answers would not be comparable")
    template = ["--chat-template", templates.pop()] if "--chat-template" not in g.args else []
    common = ["--prompts", *prompts, "--engine", g.engine, "--max-new-tokens", str(g.max_new_tokens),
              "--temperature", str(g.temperature), "--top-p", str(g.top_p), "--n", str(g.n), "--seed", str(g.seed),
              "--limit", str(g.limit), *template, *map(str, g.args)]
    errors = io.StringIO()
    try:
        with PARSE_LOCK, contextlib.redirect_stderr(errors):
            generate.parse_args(["--model", "m", "--out", "o", *common])
    except SystemExit:
        said = (errors.getvalue().strip().splitlines() or ["generate.args asks generate.py to exit (--help?)"])[-1]
        raise ConfigError(f"{sweep_file}: generate: {said}") from None
    by_key = {j.key: j for j in jobs}
    models = [("sft", sweep.sft.path or str(out / "sft" / "final"), by_key.get("sft"))]
    models += [(j.key, str(out / j.key / "final"), j) for j in jobs if j.kind == "dpo"]
    targets = []
    for name, model, trainer in models:
        answers = out / "generations" / f"{name}.jsonl"
        argv = ["--model", model, "--out", str(answers), "--name", name, *common]
        targets.append(GenTarget(f"generate/{name}", name, model, answers, argv, trainer))
    return targets


def generation_marker(argv: list, model: str) -> dict:
    """Written next to the answers when generate.py finished (the model as it is then: a job submitted before its
    training ended must not record the model's absence): valid while the arguments and the model match."""
    return {"argv": argv, "model": model_stamp(model)}


def classify_generation(targets: list[GenTarget], record: dict, states: dict[str, str]) -> None:
    for t in targets:
        t.job_id = record["jobs"].get(t.key, {}).get("job_id", "")
        state = states.get(t.key, "")
        trainer = t.trainer.state if t.trainer else "completed"
        foreign = t.trainer and t.trainer.state == "active" and record["jobs"].get(t.trainer.key, {}).get("executor") != "slurm"
        if t.out.is_file() and _read_json(t.out.with_suffix(".done.json")) == generation_marker(t.argv, t.model) \
                and trainer == "completed":
            t.state, t.detail = "completed", f"{len(read_jsonl(t.out))} answers written, same model and settings"
        elif state in ACTIVE_STATES:
            t.state, t.detail = "active", f"job {t.job_id} is {state}"
        elif trainer == "completed":
            t.state, t.detail = "submit", "model finished" + (f"; job {t.job_id} ended {state}" if t.job_id else "")
        elif trainer == "active" and not foreign:
            t.state, t.detail = "waiting", f"starts when training job {t.trainer.job_id} ends"
        elif trainer == "active":
            t.state, t.detail = "blocked", f"training is running under another launch ({t.trainer.detail}); run --generate when it ends"
        else:
            t.state, t.detail = "blocked", "training not finished and not queued: run the sweep first"


class GenerateJob(submitit.helpers.Checkpointable):
    """`python <code>/generate.py ...` as a submitit job. generate.py skips answers already written, so a requeue
    after a timeout or preemption loses at most the batch in flight."""

    def __init__(self, code_dir: str, workdir: str, env: dict):
        self.code_dir, self.workdir, self.env = code_dir, workdir, env
        self._proc = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update(state, _proc=None)

    def __call__(self, spec: dict) -> dict:
        script = spec.get("script", "generate.py")  # judge.py jobs are the same shape: resumable, marker at the end
        if spec.get("made_by_sweep") and not Path(spec["model"]).expanduser().is_dir():
            raise RuntimeError(f"{spec['model']} does not exist: its training did not finish")
        cmd = [sys.executable, str(Path(self.code_dir) / script), *spec["argv"]]
        # the answers as judge.py reads them: answers rewritten while it runs are not recorded as judged
        marker = judging_marker(spec["argv"], spec["inputs"]) if script == "judge.py" else None
        if script == "analyze_sweep.py":  # the files the report is made from, as they are when it starts
            marker = analysis_marker(spec["argv"], Path(spec["sweep"]))
        print("+ " + shlex.join(cmd), flush=True)
        errors: list[str] = []
        try:
            self._proc = subprocess.Popen(cmd, cwd=self.workdir, env={**os.environ, **self.env}, start_new_session=True,
                                          stderr=subprocess.PIPE, text=True, errors="replace")
            tee = threading.Thread(target=_tee, args=(self._proc.stderr, errors), daemon=True)
            tee.start()
            while self._proc.poll() is None:
                time.sleep(0.5)
            tee.join(timeout=10)
        finally:
            stop_tree(self._proc)
        if self._proc.returncode != 0:
            said = next((line for line in reversed(errors) if line.startswith("error: ")), "see the job log")
            raise RuntimeError(f"{script} for {spec.get('model') or spec['key']} ended with exit code "
                               f"{self._proc.returncode}: {said}")
        if script == "judge.py":
            Path(spec["marker"]).write_text(json.dumps(marker))
            return {"mode": "judge", "out": spec["out"], "verdicts": len(read_jsonl(spec["out"]))}
        if script == "analyze_sweep.py":
            Path(spec["marker"]).write_text(json.dumps(marker))
            return {"mode": "analyze", "out": spec["out"]}
        Path(spec["marker"]).write_text(json.dumps(generation_marker(spec["argv"], spec["model"])))
        return {"mode": "generate", "out": spec["out"], "answers": len(read_jsonl(spec["out"]))}

    def checkpoint(self, spec: dict):
        stop_tree(self._proc)  # rows already written stay; the requeued job skips them
        return submitit.helpers.DelayedSubmission(GenerateJob(self.code_dir, self.workdir, self.env), spec)


def _tee(stream, last: list) -> None:
    """Copy generate.py's stderr to the job log, keeping the last lines for the failure message."""
    for line in stream:
        sys.stderr.write(line)
        last.append(line.strip())
        del last[:-50]
    sys.stderr.flush()


def generation_spec(t: GenTarget) -> dict:
    return {"key": t.key, "model": t.model, "argv": t.argv, "out": str(t.out), "made_by_sweep": t.trainer is not None,
            "marker": str(t.out.with_suffix(".done.json"))}


def say_stage_plan(targets: list, executor: str, say) -> None:
    """One line per generation, judging or analysis target: what this launch does with it."""
    for t in targets:
        verb = {"completed": "skip", "active": "wait", "submit": "SUBMIT", "blocked": "skip",
                "waiting": "SUBMIT" if executor == "slurm" else "wait"}[t.state]
        say(f"  {verb:6} {t.name:24} {t.detail}")


def open_submission(args, out: Path, record: dict, stage: str, say):
    """(code snapshot, remember) for a generation or judging launch: the snapshot its jobs run, and remember(key,
    job_id, executor), which files each job in the sweep record the moment it is accepted."""
    code = snapshot_code(out)
    say(f"code snapshot: {code}")
    submission = {"time": _now(), "config": args.config, "code": str(code), "executor": args.executor,
                  "stage": stage, "jobs": {}}
    record["submissions"].append(submission)

    def remember(key: str, job_id: str, kind: str) -> None:
        record["jobs"][key] = {"job_id": job_id, "executor": kind, "submitted": _now()}
        submission["jobs"][key] = job_id
        write_record(out, record)

    return code, remember


def submit_generation(args, sweep: Sweep, jobs: list[Job], out: Path, say) -> int:
    """Answers for the SFT model and every DPO run: one array for the models that are finished, one waiting
    (afterany) on the training jobs still queued or running; locally, the finished models one after another."""
    record, states, targets = generation_state(sweep, jobs, out, args.config)
    say(f"sweep {sweep.name}: answers for {len(targets)} model(s) in {out / 'generations'}/")
    say_stage_plan(targets, args.executor, say)
    todo = [t for t in targets if t.state in ("submit", "waiting")]
    if args.executor != "slurm":
        todo = [t for t in todo if t.state == "submit"]
    if args.dry_run or not todo:
        say("dry run: nothing submitted" if args.dry_run else "nothing to submit: every model is answered, queued "
            "or not trained yet")
        return 0 if args.dry_run or not any(t.state == "blocked" for t in targets) else 1
    if "heldout" in sweep.generate.prompts:
        heldout_config(jobs, out, args.config, write=True)
    code, remember = open_submission(args, out, record, "generate", say)
    stage_slurm = {**sweep.generate.slurm, "nodes": 1}
    if args.executor == "slurm":
        ready = [t for t in todo if t.state == "submit"]
        waiting = [t for t in todo if t.state == "waiting"]
        for group, deps in ((ready, []), (waiting, sorted({t.trainer.job_id for t in waiting}))):
            if not group:
                continue
            executor, _ = make_executor("slurm", out, code, sweep, stage_slurm, deps, dependency_type="afterany")
            task = GenerateJob(str(code), os.getcwd(), dict(sweep.launch.env))
            try:
                array = executor.map_array(task, [generation_spec(t) for t in group])
            except submitit.core.utils.FailedJobError as e:
                raise UserInputError(f"sbatch refused the job: {str(e).strip()}") from None
            for t, handle in zip(group, array):
                remember(t.key, handle.job_id, "slurm")
            say(f"submitted generation for {len(group)} model(s) as array job {array[0].job_id.split('_')[0]}"
                + (f" (after training jobs {', '.join(deps)} end)" if deps else ""))
        say(f"watch it: python slurm/sweep.py --config {args.config} --generate --status")
        return 0
    executor, _ = make_executor(args.executor, out, code, sweep, stage_slurm)
    task, ok = GenerateJob(str(code), os.getcwd(), dict(sweep.launch.env)), True
    for t in todo:
        handle = executor.submit(task, generation_spec(t))
        remember(t.key, str(handle.job_id), args.executor)
        say(f"started generation for {t.name} ({args.executor} job {handle.job_id})")
        try:
            result = handle.result()
            say(f"{t.name}: {result['answers']} answers in {t.out}")
        except Exception as e:
            say(f"generation for {t.name} FAILED: {failure_line(e)}"
                + (f"; log: {handle.paths.stderr}" if args.executor == "local" else ""))
            ok = False
    return 0 if ok else 1


def generation_state(sweep: Sweep, jobs: list[Job], out: Path, sweep_file: str):
    """(job record, scheduler states, classified generation targets): where training and generation stand."""
    record = read_record(out)
    states = scheduler_states(record, out)
    classify(jobs, record, states)
    targets = generation_plan(sweep, jobs, sweep_file)
    classify_generation(targets, record, states)
    return record, states, targets


def generation_status(sweep: Sweep, jobs: list[Job], out: Path, sweep_file: str) -> None:
    _, states, targets = generation_state(sweep, jobs, out, sweep_file)
    rows = [{"model": t.name, "job": t.job_id or "-", "state": states.get(t.key, "-"),
             "answers": len(read_jsonl(t.out)) if t.out.is_file() else 0,
             "done": "yes" if t.state == "completed" else "no", "file": t.out} for t in targets]
    print_table(rows, {k: k for k in rows[0]})


# ---------------------------------------------------------------- judging stage (--judge)


@dataclass
class JudgeTarget:
    """judge.py for the calibration sets, or for one DPO run's answers against the SFT answers."""
    key: str              # judge/calibration | judge/<run name>
    name: str
    out: Path             # <sweep>/judgments/<name>.jsonl (summary beside it)
    argv: list
    inputs: list          # files judge.py reads: the marker stamps them, so new answers mean a new judging
    deps: list            # the generation (and calibration) targets that make the inputs
    state: str = ""
    detail: str = ""
    job_id: str = ""


def judging_marker(argv: list, inputs: list) -> dict:
    return {"argv": argv, "inputs": [file_stamp(p) for p in inputs]}


def file_stamp(path) -> str:
    p = Path(path)
    return f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.is_file() else f"{p.name}:missing"


def summary_of(out: Path) -> Path:
    return out.with_name(out.name[:-len(".jsonl")] + ".summary.json")


def judging_plan(sweep: Sweep, jobs: list[Job], sweep_file: str, gen_targets: list[GenTarget]) -> list[JudgeTarget]:
    """A calibration target (when judge.calibrate names sets) and one comparison per DPO run against the SFT answers,
    checked by judge.py's own parser."""
    import judge

    j, out = sweep.judge, sweep_dir(sweep)
    folder = out / "judgments"
    common = ["--judge-model", j.judge_model, "--engine", j.engine, "--mode", j.mode, "--order", j.order,
              "--template", j.template, "--seed", str(j.seed), *map(str, j.args)]
    calibrate = [f"heldout:{heldout_config(jobs, out, sweep_file)}" if c == "heldout" else c for c in j.calibrate]
    errors = io.StringIO()
    try:
        with PARSE_LOCK, contextlib.redirect_stderr(errors):
            judge.parse_args(["--candidate", "c", "--baseline", "b", "--out", "o", "--limit", str(j.limit), *common])
            if calibrate:
                judge.parse_args(["--out", "o", "--calibrate", *calibrate, "--calibration-limit",
                                  str(j.calibration_limit), *common])
    except SystemExit:
        said = (errors.getvalue().strip().splitlines() or ["judge.args asks judge.py to exit (--help?)"])[-1]
        raise ConfigError(f"{sweep_file}: judge: {said}") from None
    targets, calibration = [], None
    if calibrate:
        cal_out = folder / "calibration.jsonl"
        calibration = JudgeTarget("judge/calibration", "calibration", cal_out,
                                  ["--calibrate", *calibrate, "--calibration-limit", str(j.calibration_limit),
                                   "--out", str(cal_out), *common], [], [])
        targets.append(calibration)
    by_name = {t.name: t for t in gen_targets}
    sft = by_name["sft"]
    for t in gen_targets:
        if t.name == "sft":
            continue
        verdicts = folder / f"{t.name}.jsonl"
        argv = ["--candidate", str(t.out), "--baseline", str(sft.out), "--out", str(verdicts), "--limit", str(j.limit),
                *common]
        inputs, deps = [t.out, sft.out], [t, sft]
        if calibration:
            argv += ["--calibration", str(summary_of(calibration.out))]
            inputs, deps = inputs + [summary_of(calibration.out)], deps + [calibration]
        targets.append(JudgeTarget(f"judge/{t.name}", t.name, verdicts, argv, [str(p) for p in inputs], deps))
    return targets


def classify_judging(targets: list[JudgeTarget], record: dict, states: dict[str, str]) -> None:
    """completed (verdicts for these inputs and settings) | active | submit (inputs ready) | waiting (inputs being
    made by queued jobs) | blocked (inputs missing and nothing queued to make them)."""
    for t in targets:  # calibration comes first, so comparisons see its state
        t.job_id = record["jobs"].get(t.key, {}).get("job_id", "")
        state = states.get(t.key, "")
        pending = [d for d in t.deps if d.state != "completed"]
        if t.out.is_file() and summary_of(t.out).is_file() and not pending \
                and _read_json(t.out.with_suffix(".done.json")) == judging_marker(t.argv, t.inputs):
            t.state, t.detail = "completed", f"{_read_json(summary_of(t.out)).get('n', 'all')} pairs judged, same " \
                                             f"answers and settings"
        elif state in ACTIVE_STATES:
            t.state, t.detail = "active", f"job {t.job_id} is {state}"
        elif not pending:
            t.state, t.detail = "submit", "inputs ready" + (f"; job {t.job_id} ended {state}" if t.job_id else "")
        elif all((d.state == "active" and record["jobs"].get(d.key, {}).get("executor") == "slurm")
                 or (d.state == "submit" and isinstance(d, JudgeTarget)) for d in pending):
            # generation jobs queued on Slurm (a dependency can name them), or the calibration submitted with this launch
            t.state = "waiting"
            t.detail = "after " + ", ".join(f"{d.key} ({d.state})" for d in pending)
        else:
            t.state, t.detail = "blocked", "needs " + ", ".join(f"{d.key} ({d.state}: {d.detail})" for d in pending)


def judging_state(sweep: Sweep, jobs: list[Job], out: Path, sweep_file: str):
    record, states, gen_targets = generation_state(sweep, jobs, out, sweep_file)
    targets = judging_plan(sweep, jobs, sweep_file, gen_targets)
    classify_judging(targets, record, states)
    return record, states, targets


def judging_spec(t: JudgeTarget) -> dict:
    return {"key": t.key, "script": "judge.py", "argv": t.argv, "out": str(t.out), "inputs": t.inputs,
            "marker": str(t.out.with_suffix(".done.json"))}


def submit_judging(args, sweep: Sweep, jobs: list[Job], out: Path, say) -> int:
    """Calibration once, then every DPO run against SFT. On Slurm: calibration as one job, comparisons as an array
    waiting (afterany) on it and on generation jobs still queued or running; locally, one after another."""
    record, states, targets = judging_state(sweep, jobs, out, args.config)
    say(f"sweep {sweep.name}: judge {sweep.judge.judge_model} on {len(targets)} target(s) in {out / 'judgments'}/")
    say_stage_plan(targets, args.executor, say)
    todo = [t for t in targets if t.state in ("submit", "waiting")]
    if args.executor != "slurm":
        todo = [t for t in todo if t.state == "submit" or all(d in todo or d.state == "completed" for d in t.deps)]
    if args.dry_run or not todo:
        say("dry run: nothing submitted" if args.dry_run else "nothing to submit: every run is judged, queued or "
            "waiting for its answers")
        return 0 if args.dry_run or not any(t.state == "blocked" for t in targets) else 1
    if any(c.startswith("heldout") for c in sweep.judge.calibrate):
        heldout_config(jobs, out, args.config, write=True)
    code, remember = open_submission(args, out, record, "judge", say)
    stage_slurm = {**sweep.judge.slurm, "nodes": 1}
    task = GenerateJob(str(code), os.getcwd(), dict(sweep.launch.env))
    if args.executor == "slurm":
        first = [t for t in todo if t.key == "judge/calibration"]
        for group in (first, [t for t in todo if t.key != "judge/calibration"]):
            if not group:
                continue
            deps = sorted({d.job_id for t in group for d in t.deps if d.state != "completed" and d.job_id})
            executor, _ = make_executor("slurm", out, code, sweep, stage_slurm, deps, dependency_type="afterany")
            try:
                array = executor.map_array(task, [judging_spec(t) for t in group])
            except submitit.core.utils.FailedJobError as e:
                raise UserInputError(f"sbatch refused the job: {str(e).strip()}") from None
            for t, handle in zip(group, array):
                remember(t.key, handle.job_id, "slurm")
                t.job_id, t.state = handle.job_id, "active"
            say(f"submitted judging of {len(group)} target(s) as array job {array[0].job_id.split('_')[0]}"
                + (f" (after jobs {', '.join(deps)} end)" if deps else ""))
        say(f"watch it: python slurm/sweep.py --config {args.config} --judge --status")
        return 0
    executor, _ = make_executor(args.executor, out, code, sweep, stage_slurm)
    ok = True
    for t in todo:
        if any(d.state != "completed" for d in t.deps):
            say(f"judging {t.name} skipped: " + ", ".join(f"{d.key} did not finish" for d in t.deps
                                                          if d.state != "completed"))
            ok = False
            continue
        handle = executor.submit(task, judging_spec(t))
        remember(t.key, str(handle.job_id), args.executor)
        say(f"started judging {t.name} ({args.executor} job {handle.job_id})")
        try:
            handle.result()
            t.state = "completed"
            say(f"{t.name}: {judged_line(t.out)}")
        except Exception as e:
            say(f"judging {t.name} FAILED: {failure_line(e)}"
                + (f"; log: {handle.paths.stderr}" if args.executor == "local" else ""))
            t.state, ok = "failed", False
    return 0 if ok else 1


def judged_line(out: Path) -> str:
    """The summary's headline: win rate and CI, or the calibration agreement."""
    s = _read_json(summary_of(out))
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    if "win_rate" in s:
        ci = s.get("win_rate_ci") or [None, None]
        return (f"win rate {pct(s['win_rate'])} [{pct(ci[0])}, {pct(ci[1])}] over {s['n']} pairs "
                f"({s['errors']} errors)")
    cal = s.get("calibration") or {}
    ci = cal.get("agreement_ci") or [None, None]
    return f"agreement with human labels {pct(cal.get('agreement'))} [{pct(ci[0])}, {pct(ci[1])}] on {cal.get('pairs', 0)} pairs"


def judging_status(sweep: Sweep, jobs: list[Job], out: Path, sweep_file: str) -> None:
    _, states, targets = judging_state(sweep, jobs, out, sweep_file)
    rows = []
    for t in targets:
        s = _read_json(summary_of(t.out))
        cal = s.get("calibration") or {}
        ci = s.get("win_rate_ci") or cal.get("agreement_ci") or [None, None]
        rows.append({"target": t.name, "job": t.job_id or "-", "state": states.get(t.key, "-"),
                     "done": "yes" if t.state == "completed" else "no",
                     "win_rate": _fmt(s.get("win_rate")), "ci_low": _fmt(ci[0]), "ci_high": _fmt(ci[1]),
                     "errors": s.get("errors", "-"), "agreement": _fmt(cal.get("agreement")), "file": t.out})
    print_table(rows, {k: k for k in rows[0]})


# ---------------------------------------------------------------- analysis stage (--analyze)

ANALYSIS_SKIPS = {"submitit", "code", "ref_cache", "checkpoints", "final", "replaced"}  # never read by the analysis
ANALYSIS_MARKER = "analysis.done.json"


def analysis_marker(argv: list, out: Path) -> dict:
    """The report's arguments and the names, sizes and mtimes of every file under the sweep folder that the analysis
    may read (not models, checkpoints, code snapshots, logs or the job record): the same files make the same report."""
    files = []
    for folder, dirs, names in os.walk(out):
        dirs[:] = [d for d in dirs if d not in ANALYSIS_SKIPS]
        for name in names:
            if name in ("sweep.json", ".lock", ANALYSIS_MARKER) or ".tmp" in name or name.endswith(".lock"):
                continue
            with contextlib.suppress(FileNotFoundError):  # a temporary file renamed while we look
                st = (Path(folder) / name).stat()
                files.append((str(Path(folder, name).relative_to(out)), st.st_size, st.st_mtime_ns))
    digest = hashlib.sha256(json.dumps(sorted(files)).encode()).hexdigest()[:16]
    return {"argv": argv, "inputs": digest, "files": len(files)}


@dataclass
class AnalysisTarget:
    """analyze_sweep.py over the sweep folder, writing report/<name>/."""
    key: str
    name: str
    out: Path             # the report folder
    argv: list
    sweep: Path
    after: list = field(default_factory=list)  # Slurm job ids of the sweep still queued or running
    state: str = ""       # completed | active | submit (nothing it reads is being made) | waiting (jobs still run)
    detail: str = ""
    job_id: str = ""


def analysis_state(sweep: Sweep, out: Path):
    """(job record, scheduler states, the analysis target)."""
    record = read_record(out)
    states = scheduler_states(record, out)
    return record, states, analysis_target(sweep, out, record, states)


def analysis_target(sweep: Sweep, out: Path, record: dict, states: dict[str, str]) -> AnalysisTarget:
    """The report is complete while its marker matches the sweep's files; it waits while any job of the sweep is
    queued or running."""
    report = Path(sweep.report or Path("report") / sweep.name)
    t = AnalysisTarget("analyze", "report", report, ["--sweep", str(out), "--out", str(report)], out)
    t.job_id = record["jobs"].get(t.key, {}).get("job_id", "")
    active = [record["jobs"][k] for k, s in states.items() if s in ACTIVE_STATES and k != t.key]
    busy = sorted({r["job_id"] for r in active})
    t.after = sorted({r["job_id"].split("_")[0] for r in active if r.get("executor") == "slurm"})
    if states.get(t.key) in ACTIVE_STATES:
        t.state, t.detail = "active", f"job {t.job_id} is {states[t.key]}"
    elif busy:  # whatever the marker says, what it reads is about to change
        t.state, t.detail = "waiting", f"after jobs {', '.join(busy)} end"
    elif _read_json(out / ANALYSIS_MARKER) == analysis_marker(t.argv, out) and (report / "README.md").is_file():
        t.state, t.detail = "completed", f"{report}/README.md is made from the sweep's current files"
    else:
        t.state, t.detail = "submit", "every job of the sweep has ended"
    return t


def submit_analysis(args, sweep: Sweep, jobs: list[Job], out: Path, say) -> int:
    """The report, once nothing it reads is still being made: on Slurm one CPU job waiting (afterany) on every job of
    the sweep still queued or running; locally, now."""
    record, states, t = analysis_state(sweep, out)
    say(f"sweep {sweep.name}: report in {t.out}/")
    say_stage_plan([t], args.executor, say)
    if args.dry_run or t.state in ("completed", "active") or (t.state == "waiting" and args.executor != "slurm"):
        say("dry run: nothing submitted" if args.dry_run else "nothing to submit")
        return 0
    code, remember = open_submission(args, out, record, "analyze", say)
    spec = {"key": t.key, "script": "analyze_sweep.py", "argv": t.argv, "out": str(t.out), "sweep": str(out),
            "marker": str(out / ANALYSIS_MARKER)}
    task = GenerateJob(str(code), os.getcwd(), dict(sweep.launch.env))
    cpu_only = {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 4, "timeout_min": 30,
                "constraint": None, "additional": {}}  # not the GPU nodes' features or gres
    if args.executor == "slurm":
        deps = t.after if t.state == "waiting" else []
        executor, _ = make_executor("slurm", out, code, sweep, cpu_only, deps, dependency_type="afterany")
        try:
            handle = executor.submit(task, spec)
        except submitit.core.utils.FailedJobError as e:
            raise UserInputError(f"sbatch refused the job: {str(e).strip()}") from None
        remember(t.key, handle.job_id, "slurm")
        say(f"submitted the analysis as job {handle.job_id}" + (f" (after jobs {', '.join(deps)} end)" if deps else ""))
        return 0
    executor, _ = make_executor(args.executor, out, code, sweep, cpu_only)
    handle = executor.submit(task, spec)
    remember(t.key, str(handle.job_id), args.executor)
    say(f"started the analysis ({args.executor} job {handle.job_id})")
    try:
        handle.result()
    except Exception as e:
        say(f"analysis FAILED: {failure_line(e)}" + (f"; log: {handle.paths.stderr}" if args.executor == "local" else ""))
        return 1
    say(f"report: {t.out}/README.md")
    return 0


# ---------------------------------------------------------------- main


def say(message: str) -> None:
    print(f"[sweep {datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def submit(args, sweep: Sweep, jobs: list[Job], out: Path, say, kinds=("sft", "reference", "dpo")) -> int:
    """The training stages named in `kinds` (pipeline.py launches them one kind at a time): on Slurm chained to
    whatever earlier stage is still queued; locally one after another."""
    record = read_record(out)
    states = scheduler_states(record, out)
    classify(jobs, record, states)
    for job in jobs:
        if job.kind not in kinds and job.state == "submit":
            job.state = "held"  # another stage's job: neither submitted nor waited for by this launch
    order = ("sft", "reference", "dpo")
    unfinished = [j for j in jobs if order.index(j.kind) < min(map(order.index, kinds)) and j.state == "held"]
    if unfinished:  # its inputs were not made and nothing queued will make them
        say(f"{', '.join(kinds)}: nothing submitted: {', '.join(j.key for j in unfinished)} did not finish "
            f"({'; '.join(j.detail for j in unfinished)})")
        return 1
    say(f"sweep {sweep.name}: {len([j for j in jobs if j.kind == 'dpo'])} DPO run(s) in {out}/")
    for job in (j for j in jobs if j.kind in kinds):
        verb = {"completed": "skip", "active": "wait", "submit": "SUBMIT"}[job.state]
        say(f"  {verb:6} {job.kind:9} {job.key:24} {job.detail}")
    r = sweep.slurm
    say(f"each job: {r.nodes} node(s) x "
        f"{f'{r.gpus_per_node} GPU(s)' if r.gpus_per_node else f'{sweep.launch.cpu_processes} CPU process(es)'}, "
        f"{r.cpus_per_task} CPUs, {r.mem_gb:g} GB, {r.timeout_min} min (then checkpoint + requeue)"
        + (f", partition {r.partition}" if r.partition else "") + f"; array at most {r.array_parallelism} at once")
    todo = [j for j in jobs if j.state == "submit"]
    if args.dry_run or not todo:
        say("dry run: nothing submitted" if args.dry_run else "nothing to submit: every run is finished or queued")
        return 0
    foreign = [j for j in jobs if j.state == "active" and record["jobs"][j.key]["executor"] != args.executor]
    if foreign or (args.executor != "slurm" and any(j.state == "active" for j in jobs)):
        busy = foreign or [j for j in jobs if j.state == "active"]
        raise UserInputError(f"{', '.join(f'{j.key} ({j.detail})' for j in busy)} still running under another "
                             f"launch; wait for it or --cancel it first")
    for job in todo:
        job.config_path.parent.mkdir(parents=True, exist_ok=True)
        job.config_path.write_text(f"# written by slurm/sweep.py for {args.config}\n" + to_yaml(job.config))
    code = snapshot_code(out)
    say(f"code snapshot: {code}")
    submission = {"time": _now(), "config": args.config, "code": str(code), "executor": args.executor, "jobs": {}}
    record["submissions"].append(submission)
    if args.executor != "slurm":
        ok = run_in_order(args.executor, sweep, jobs, out, code, record, say)
        return 0 if ok else 1

    def remember(key: str, job_id: str) -> None:
        record["jobs"][key] = {"job_id": job_id, "executor": "slurm", "submitted": _now()}
        submission["jobs"][key] = job_id
        write_record(out, record)

    try:
        submit_slurm(sweep, jobs, out, code, say, remember)
    except submitit.core.utils.FailedJobError as e:
        raise UserInputError(f"sbatch refused the job: {str(e).strip()}") from None
    say(f"watch it: python slurm/sweep.py --config {args.config} --status")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweep_default.yaml")
    parser.add_argument("--executor", choices=("slurm", "local", "debug"), default="slurm",
                        help="slurm: sbatch job arrays (default); local: subprocesses here; debug: in this process")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and submit nothing")
    mode.add_argument("--status", action="store_true", help="print one line per run: job, state, step, eval metrics")
    mode.add_argument("--cancel", action="store_true", help="cancel the sweep's queued and running jobs")
    parser.add_argument("--generate", action="store_true",
                        help="the generation stage: answers from the SFT model and every DPO run (with --dry-run, "
                             "--status: its plan, its table)")
    parser.add_argument("--judge", action="store_true",
                        help="the judging stage: calibration, then every DPO run's answers against SFT's (with "
                             "--dry-run, --status: its plan, its table)")
    parser.add_argument("--analyze", action="store_true",
                        help="the analysis stage: report/<name>/ from the sweep folder once its jobs have ended "
                             "(with --status: whether the report is current)")
    parser.add_argument("overrides", nargs="*", help="sweep overrides: slurm.partition=gpu grid.loss.beta=[0.1,0.3]")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    if args.generate + args.judge + args.analyze > 1:
        parser.error("--generate, --judge and --analyze are separate stages: run one, then the next "
                     "(python pipeline.py runs them all)")

    try:
        sweep = load_sweep(args.config, args.overrides)
        jobs = build_plan(sweep, args.config)
        out = sweep_dir(sweep)
        if args.analyze and args.status:
            _, states, t = analysis_state(sweep, out)
            print_table([{"target": t.name, "job": t.job_id or "-", "state": states.get(t.key, "-"),
                          "done": "yes" if t.state == "completed" else "no", "detail": t.detail}],
                        {k: k for k in ("target", "job", "state", "done", "detail")})
            return 0
        if (args.generate or args.judge) and args.status:
            (judging_status if args.judge else generation_status)(sweep, jobs, out, args.config)
            return 0
        if args.status or args.cancel:
            record = read_record(out)
            states = scheduler_states(record, out)
            if args.status:
                print_table(status_rows(jobs, record, states))
            else:
                cancel(record, states, say)
            return 0
        if args.executor == "slurm" and not args.dry_run and not shutil.which("sbatch"):
            raise UserInputError("sbatch not found: this is not a Slurm login node. Use --executor local, or start "
                                 "the local cluster: bash slurm/local_cluster.sh up && eval \"$(bash "
                                 "slurm/local_cluster.sh env)\"")
        with sweep_lock(out, shared=args.dry_run):  # plan and submit under one lock: no run submitted twice
            stage = (submit_analysis if args.analyze else submit_judging if args.judge
                     else submit_generation if args.generate else submit)
            return stage(args, sweep, jobs, out, say)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
