"""The sweep file: what a sweep is made of, read with config.py's one builder and one override parser.

    sweep = load_sweep("configs/sweep_default.yaml", ["slurm.partition=gpu", "grid.loss.beta=[0.05,0.1]"])
    runs = grid_runs(sweep)            # [("beta0.05_seed0", ["loss.beta=0.05", "train.seed=0"]), ...]

A sweep names a base training config, overrides for every run, a grid (any training config key), Slurm resources,
and the settings of the later stages: `generate:` holds generate.py's arguments (GenerateArgs fields) and `judge:`
judge.py's (JudgeArgs fields); they are checked by building those dataclasses, as the scripts' own command lines do.
Runs get readable names from the grid (`beta0.1_seed0`) and write to <root>/<name>/<run>/.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import objectives
from arguments import GenerateArgs, JudgeArgs
from config import (ArgsError, Config, ConfigError, path_problem, PruneConfig, build, flag, load, load_config, parse_flags, require,
                    to_dict, to_yaml)

LAUNCHER_KEYS = ("output_dir", "loss.name", "loss.ref_cache_dir", "train.resume")  # set by the launcher for every run
SHORT_NAMES = {"loss.type": "", "loss.label_smoothing": "ls"}  # otherwise a key's last part: beta, seed, lr


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
            require(getattr(self, name) >= 1, f"slurm.{name}", "must be at least 1")
        require(self.gpus_per_node >= 0, "slurm.gpus_per_node", "must be 0 or more")
        require(self.mem_gb > 0, "slurm.mem_gb", "must be positive")
        require(self.signal_delay_s >= 0, "slurm.signal_delay_s", "must be 0 or more")


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
        require(self.cpu_processes >= 1, "launch.cpu_processes", "must be at least 1")
        require(self.local_parallelism >= 1, "launch.local_parallelism", "must be at least 1")
        if self.deepspeed_config:
            problem = deepspeed_problem(self.deepspeed_config)
            if problem:
                raise ConfigError(problem)


def deepspeed_problem(path: str) -> str | None:
    """What is wrong with a DeepSpeed JSON (launch.deepspeed_config), in one line naming it; None when it reads as
    one: a JSON object whose zero_optimization.stage, if given, is 0-3."""
    problem = path_problem(path)
    if problem:
        return f"launch.deepspeed_config={path}: {problem}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        return f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if not isinstance(data, dict):
        return f"{path}: expected a JSON object of DeepSpeed settings, found {type(data).__name__}"
    zero = data.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return f"{path}: zero_optimization should be an object, found {zero!r}"
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        return f"{path}: zero_optimization.stage is {stage!r}; DeepSpeed's ZeRO stages are 0, 1, 2 and 3"
    return None


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


@dataclass(kw_only=True)
class GenerateStage(GenerateArgs):
    """generate.py's arguments for every model of the sweep: any GenerateArgs field (--max-new-tokens is
    max_new_tokens here); --model, --out and --name are the launcher's."""

    model: str = ""
    out: str = ""
    prompts: list[str] = field(default_factory=lambda: ["heldout"])
    """generate.py --prompts for every model: heldout (the pairs the sweep's runs held out), mt_bench, alpaca_eval, a
    .jsonl file."""
    base: bool = False
    """Also answer with the model SFT started from (generations/base.jsonl; not judged): the report's answer table
    then shows what SFT changed (length, answers cut at max_new_tokens, degenerate answers)."""
    args: list[str] = field(default_factory=list)
    """Further generate.py flags as on its command line, e.g. [--turns, both, --dtype, bfloat16]."""
    slurm: dict[str, typing.Any] = field(default_factory=dict)
    """Slurm resources that differ for generation jobs, e.g. {gpus_per_node: 1, timeout_min: 120} (one node each)."""

    def __post_init__(self):
        for key in ("model", "out", "name"):
            require(not getattr(self, key), f"generate.{key}", "is set by the launcher for each job")
        try:
            super().__post_init__()
        except ArgsError as e:
            raise ConfigError(f"generate: {e}") from None


@dataclass(kw_only=True)
class JudgeStage(JudgeArgs):
    """judge.py's arguments for the sweep's calibration and comparisons: any JudgeArgs field; --candidate,
    --baseline, --out and --calibration are the launcher's."""

    LAUNCHER_SETS_OUT: typing.ClassVar[bool] = True
    judge_model: str | list[str] = "meta-llama/Meta-Llama-3-8B-Instruct"
    out: str = ""
    calibrate: list[str] = field(default_factory=lambda: ["llmbar:Natural", "llmbar:Adversarial", "heldout"])
    """Human-labelled sets the judge is measured on once per sweep ([] = none); heldout = the sweep's held-out pairs;
    pairs:FILE[:prompt=COL,...] a file of your own (relative to where the sweep is launched)."""
    panel: list[dict[str, str]] = field(default_factory=list)
    """Several judges, each {judge_model: ..., template: ...} (template optional: judge.template), judged and cached
    on their own and combined by panel_combine; instead of judge_model."""
    args: list[str] = field(default_factory=list)
    """Further judge.py flags as on its command line, e.g. [--base-url, http://judge-node:8000/v1]."""
    slurm: dict[str, typing.Any] = field(default_factory=dict)
    """Slurm resources that differ for judging jobs, e.g. {gpus_per_node: 1} (one node each)."""

    def __post_init__(self):
        for key in ("candidate", "baseline", "out", "calibration"):
            require(not getattr(self, key), f"judge.{key}", "is set by the launcher for each job")
        if self.panel:
            default = JudgeStage.__dataclass_fields__["judge_model"].default
            require(self.judge_model in (default, [default]), "judge.panel", "names the judges: leave judge.judge_model out")
            templates = self.template if isinstance(self.template, list) else [self.template]
            for i, member in enumerate(self.panel):
                unknown = sorted(set(member) - {"judge_model", "template"})
                require(not unknown, f"judge.panel[{i}].{unknown[0] if unknown else ''}",
                        "is not a panel key (judge_model, template)")
                require(bool(member.get("judge_model")), f"judge.panel[{i}].judge_model", "names no judge")
            self.judge_model = [m["judge_model"] for m in self.panel]
            self.template = [m.get("template") or templates[0] for m in self.panel]
        try:
            super().__post_init__()
        except ArgsError as e:
            raise ConfigError(f"judge: {e}") from None


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
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Rules that stop a failing DPO run early (config.PruneConfig), for every DPO run of the sweep."""
    slurm: SlurmResources = field(default_factory=SlurmResources)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    retry_pruned: typing.ClassVar[bool] = False
    """Set by the launchers' --retry-pruned (not a sweep-file key): pruned runs are trained on instead of finished."""

    def __post_init__(self):
        require(bool(re.fullmatch(r"[A-Za-z0-9._-]+", self.name or "")), "name",
                f"must be a non-empty folder name of letters, digits, . _ -; got {self.name!r}")
        require(bool(self.base), "base", "must name a training config, e.g. configs/default.yaml")
        require(bool(self.grid), "grid", "must give at least one key with values, e.g. {loss.beta: [0.1, 0.3]}")
        for key, values in self.grid.items():
            require(isinstance(values, list) and len(values) > 0, f"grid.{key}", f"expected a non-empty list; got {values!r}")
            require(len(set(map(value_text, values))) == len(values), f"grid.{key}", f"repeats a value: {values}")
        for section, keys in (("overrides", self.overrides), ("sft.overrides", self.sft.overrides),
                              ("dpo.overrides", self.dpo.overrides), ("grid", self.grid)):
            for key in keys:
                require(key not in LAUNCHER_KEYS, f"{section}.{key}", "is set by the launcher for each run")
        for section in ("sft", "reference", "generate", "judge"):
            self.resources(section)  # every stage's resources build (unknown keys, bad values named)
        for section, keys in (("dpo.overrides", self.dpo.overrides), ("grid", self.grid)):
            require("model.path" not in keys, f"{section}.model.path",
                    "DPO runs start from the SFT model: set sft.path to start them from another model")

    def resources(self, stage: str = "") -> SlurmResources:
        """The Slurm resources of one stage's jobs: slurm: with that stage's slurm: keys over it."""
        changes = getattr(self, stage).slurm if stage in ("sft", "reference", "generate", "judge") else {}
        return build(SlurmResources, {**asdict(self.slurm), **changes}, f"{stage}.slurm." if stage else "slurm.",
                     "sweep")

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.name

    @property
    def report_folder(self) -> Path:
        return Path(self.report or Path("report") / self.name)


def load_sweep(path: str | Path, overrides=()) -> Sweep:
    """A sweep file with `section.key=value` overrides (`slurm.partition=gpu`, `grid.loss.beta=[0.1,0.3]`,
    `overrides.train.max_steps=8`, `sft.overrides.train.lr=1e-5`); errors name the file and the key."""
    return load(Sweep, path, overrides, kind="sweep")


def sweep_dir(sweep: Sweep) -> Path:
    return sweep.folder


def value_text(value) -> str:
    """Override text for a YAML value (strings as typed, so `no` stays the string 'no')."""
    return value if isinstance(value, str) else json.dumps(value)


def _name_part(value) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list):  # a list of objectives reads as their sum: sigmoid+sft
        text = ("+" if all(isinstance(v, str) for v in value) else "-").join(map(str, value))
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
        name = "_".join(prefix + _name_part(v) for prefix, v in zip(prefixes, values))
        runs.append((name, [f"{k}={value_text(v)}" for k, v in zip(keys, values)]))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names) or "sft" in names:
        raise ConfigError(f"grid values give clashing run names: {names}")
    return runs


# ---------------------------------------------------------------- each job's resolved config


def needs_reference(cfg: Config) -> bool:
    """A DPO run whose objectives compare against the reference gets the shared reference job."""
    return cfg.loss.name == "dpo" and objectives.needs_reference(cfg.loss.types)


def reference_group(cfg: Config) -> str:
    """What the cached reference log-probs depend on; runs that agree on it share one precompute job."""
    d = to_dict(cfg)
    key = {"model": d["model"], "data": d["data"], "tokenize": d["tokenize"], "reference": d["loss"]["reference_path"],
           "mixed_precision": d["train"]["mixed_precision"], "cache": d["loss"]["ref_cache_dir"],
           "ld_alpha": d["loss"]["ld_alpha"]}  # LD-DPO weights the reference's tokens: its own cache entry
    return json.dumps(key, sort_keys=True)


@dataclass
class TrainingJob:
    """One training job's resolved config: the SFT run, a reference precompute, or one DPO run."""
    key: str              # sft | reference-<n> | <run name>
    kind: str             # sft | reference | dpo
    config: Config
    config_path: Path     # <sweep>/configs/<key>.yaml, written at submission


def training_jobs(sweep: Sweep, sweep_file: str) -> list[TrainingJob]:
    """SFT (unless sft.path), one reference precompute per distinct (reference, data, tokenisation), the DPO runs."""
    out = sweep.folder
    common = [f"{k}={value_text(v)}" for k, v in sweep.overrides.items()]

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
        cfg = resolve("sft", common + [f"{k}={value_text(v)}" for k, v in sweep.sft.overrides.items()]
                      + ["loss.name=sft", f"output_dir={out / 'sft'}", "train.resume=auto"])
        jobs.append(TrainingJob("sft", "sft", cfg, out / "configs" / "sft.yaml"))
        policy = str(out / "sft" / "final")
    # a requeued or resubmitted run must continue from its checkpoint, whatever the base config says
    rules = [f"prune.{k}={value_text(v)}" for k, v in asdict(sweep.prune).items() if v != asdict(PruneConfig())[k]]
    dpo_common = common + rules + [f"{k}={value_text(v)}" for k, v in sweep.dpo.overrides.items()] + \
        ["loss.name=dpo", "train.resume=auto"]
    runs = []
    for name, grid_overrides in grid_runs(sweep):
        cfg = resolve(f"run {name}", dpo_common + grid_overrides + [
            f"model.path={policy}", f"output_dir={out / name}", f"loss.ref_cache_dir={out / 'ref_cache'}"])
        runs.append(TrainingJob(name, "dpo", cfg, out / "configs" / f"{name}.yaml"))
    groups: dict[str, Config] = {}
    for run in runs:
        if needs_reference(run.config):
            groups.setdefault(reference_group(run.config), run.config)
    for i, cfg in enumerate(groups.values()):
        jobs.append(TrainingJob(f"reference-{i}", "reference", cfg, out / "configs" / f"reference-{i}.yaml"))
    return jobs + runs


def heldout_config(jobs: list[TrainingJob], sweep: Sweep, sweep_file: str) -> tuple[Path, str]:
    """(path, text) of the one training config that names the held-out pairs of every run: SFT and DPO runs must
    agree on them (same data and data.split_seed), so every model answers the same prompts, none of which it was
    trained on. Written at submission, when a stage that reads it is submitted."""
    training = [j for j in jobs if j.kind in ("sft", "dpo")]
    data = {j.key: json.dumps(to_dict(j.config)["data"], sort_keys=True) for j in training}
    differing = [k for k in data if data[k] != data[training[0].key]]
    if differing:
        raise ConfigError(f"{sweep_file}: generate.prompts: heldout: {training[0].key} and {differing[0]} hold out "
                          f"different pairs (their data.* keys differ); name another prompt set or heldout:<config>")
    text = f"# written by slurm/sweep.py: the data (and held-out split) of every run in {sweep_file}\n" + \
        to_yaml(next(j for j in training if j.kind == "dpo").config)
    return (sweep.folder / "configs" / "heldout.yaml").resolve(), text


def _stage_args(cls, section: str, sweep_file: str, stage, launcher: dict, fallback: dict | None = None):
    """`cls` (GenerateArgs or JudgeArgs) from a sweep section (its fields, then its `args:` flags over them) and what
    the launcher sets for one job (`fallback`: values for fields neither sets); a bad value is named as the script's
    own command line would name it."""
    given = {f.name: getattr(stage, f.name) for f in dataclasses.fields(cls) if f.name not in launcher}
    try:
        flags = parse_flags(cls, stage.args)
        taken = sorted(set(flags) & set(launcher))
        if taken:
            raise ArgsError(f"{section}.args: {', '.join(flag(k) for k in taken)} is set by the launcher for each job")
        merged = {**given, **flags}
        merged.update({k: v for k, v in (fallback or {}).items() if not merged.get(k)})
        return cls(**merged, **launcher)
    except ArgsError as e:
        raise ConfigError(f"{sweep_file}: {section}: {e}") from None


def generate_args(sweep: Sweep, sweep_file: str, model: str, out: Path, name: str, prompts: list[str],
                  chat_template: str) -> GenerateArgs:
    """One model's generate.py arguments; the chat template is the runs' unless the sweep names one."""
    return _stage_args(GenerateArgs, "generate", sweep_file, sweep.generate,
                       dict(model=model, out=str(out), name=name, prompts=prompts), {"chat_template": chat_template})


def judge_args(sweep: Sweep, sweep_file: str, out: Path, **launcher) -> JudgeArgs:
    """judge.py's arguments for the calibration (launcher: calibrate) or one comparison (candidate, baseline,
    calibration)."""
    launcher = {"out": str(out), "calibrate": None, "candidate": "", "baseline": "", "calibration": "", **launcher}
    return _stage_args(JudgeArgs, "judge", sweep_file, sweep.judge, launcher)
