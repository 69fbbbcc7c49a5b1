"""What runs inside a sweep's jobs, and the executors that run them.

    TrainJob    `accelerate launch <code>/train_dpo.py --config <resolved>.yaml [--precompute-ref]`
    ScriptJob   `python <code>/generate.py | judge.py | analyze_sweep.py <argv>`, then its done marker

Jobs receive configs, argument lists and paths, never models, and run the code snapshot taken at submission
(<sweep>/code/<digest>/): the job's own Python starts with the snapshot first on its path, and the scripts it
launches are the snapshot's. Both are submitit Checkpointables: on Slurm's pre-timeout signal (USR2) or a
preemption the job stops its processes (training saves a checkpoint at the next step boundary first), returns the
same call, which submitit requeues, and the requeued job resumes from what is on disk. Nothing here imports the
project's heavy modules: a job's own process stays small beside the training processes it starts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import submitit

from host import resolve_mixed_precision
from jsonl import write_atomic

REPO = Path(__file__).resolve().parents[1]
# never read by the analysis, or (costs/) read but written by every job, the analysis's own included: not part of
# what makes a report current
ANALYSIS_SKIPS = {"submitit", "code", "ref_cache", "checkpoints", "final", "replaced", "costs"}
ANALYSIS_MARKER = "analysis.done.json"


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_json(path: Path, value: dict) -> None:
    """Atomic and durable (jsonl.write_atomic): neither a reader nor a machine crash ever sees half a marker."""
    write_atomic(path, json.dumps(value))


# ---------------------------------------------------------------- done markers: what a finished job was made from


def model_stamp(path: str) -> str:
    """Names, sizes and mtimes of a model folder's files (a hub id stands for itself): a re-run SFT changes it."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return f"hub:{path}"
    return hashlib.sha256(json.dumps(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                            for p in folder.iterdir() if p.is_file())).encode()).hexdigest()[:16]


def file_stamp(path) -> str:
    p = Path(path)
    return f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.is_file() else f"{p.name}:missing"


def reference_marker(spec: dict) -> dict:
    """Beside a reference job's config when it succeeded; valid while config and reference model match."""
    return {"config_sha": hashlib.sha256(Path(spec["config"]).read_bytes()).hexdigest()[:16],
            "reference": model_stamp(spec["reference"])}


def generation_marker(argv: list, model: str) -> dict:
    """Beside the answers when generate.py finished (the model as it is then: a job submitted before its training
    ended must not record the model's absence): valid while the arguments and the model match."""
    return {"argv": argv, "model": model_stamp(model)}


def judging_marker(argv: list, inputs: list) -> dict:
    """The judge's arguments and the answer files as judge.py read them: new answers mean a new judging."""
    return {"argv": argv, "inputs": [file_stamp(p) for p in inputs]}


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


# ---------------------------------------------------------------- process trees


def descendants(proc) -> list:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def signal_tree(proc, sig, tree: list | None = None) -> None:
    """Signal the job's process group and every process below it: torch's launcher starts each trainer of a
    multi-process run in a session of its own, out of reach of the group's signal."""
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


def _tee(stream, last: list) -> None:
    """Copy a script's stderr to the job log, keeping the last lines for the failure message."""
    for line in stream:
        sys.stderr.write(line)
        last.append(line.strip())
        del last[:-50]
    sys.stderr.flush()


class _ProcessJob(submitit.helpers.Checkpointable):
    """A job that runs one command in a session of its own (so the whole tree can be signalled) and polls it."""

    _proc = None
    usage: dict | None = None  # what the last command used (usage_since)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update(state, _proc=None)

    def _run(self, cmd: list[str], env: dict, on_start=None, **popen) -> int:
        print("+ " + shlex.join(cmd), flush=True)
        started, before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            self._proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, start_new_session=True, **popen)
            if on_start:
                on_start(self._proc)
            while self._proc.poll() is None:  # polled: a blocking wait() holds a lock that checkpoint() needs
                time.sleep(0.5)
        finally:
            stop_tree(self._proc)
            self.usage = usage_since(started, before)
        return self._proc.returncode


def usage_since(started: float, before) -> dict:
    """What the command and everything it started used (the children this process waited for, and theirs)."""
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"elapsed_s": round(time.time() - started, 2),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
            "max_rss_gb": round(after.ru_maxrss / 2**20, 3)}  # kilobytes on Linux: the largest process's peak


def record_cost(spec: dict, usage: dict, exit_code: int | None, gpus_per_node: int = 0) -> None:
    """One line per attempt (and node) in <sweep>/costs/<key>.jsonl: what the job's processes used, as this process
    measured it, beside what it was allocated (Slurm's environment; here: the machine). The launcher adds Slurm's
    own accounting (sacct) to the sweep record; the analysis reads both."""
    folder = spec.get("costs")
    if not folder or not usage:
        return
    env = os.environ
    slurm = "SLURM_JOB_ID" in env
    job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_TASK_ID") else \
        env.get("SLURM_JOB_ID", "")
    row = {"key": spec["key"], "ended": time.strftime("%Y-%m-%dT%H:%M:%S"), **usage, "exit_code": exit_code,
           "executor": "slurm" if slurm else "local", "job_id": job_id, "node": int(env.get("SLURM_NODEID", 0)),
           "nodes": int(env.get("SLURM_JOB_NUM_NODES", 1)), "requeues": int(env.get("SLURM_RESTART_COUNT", 0)),
           "cpus": int(env.get("SLURM_CPUS_ON_NODE") or env.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1),
           "gpus": gpus_per_node if slurm else 0}
    path = Path(folder) / (spec["key"].replace("/", "__") + ".jsonl")
    with contextlib.suppress(OSError):  # accounting must never fail the job it accounts for
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------- the jobs


class TrainJob(_ProcessJob):
    """`accelerate launch <code>/train_dpo.py --config <resolved>.yaml [--precompute-ref]` as a submitit job.

    submitit calls checkpoint() on Slurm's USR2 (the time limit is near, or `scancel --signal USR2` on preemption):
    it forwards the signal to the training processes, waits until they saved a checkpoint at a step boundary and
    exited, and returns the same call, which submitit requeues; the requeued job resumes from that checkpoint
    (train.resume=auto).
    """

    def __init__(self, code_dir: str, workdir: str, gpus_per_node: int, launch: dict, grace_s: float):
        self.code_dir, self.workdir, self.gpus_per_node = code_dir, workdir, gpus_per_node
        self.launch, self.grace_s = launch, grace_s

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
               "--mixed_precision", resolve_mixed_precision(spec["mixed_precision"])[0], "--dynamo_backend", "no", "--quiet",
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
        # The launcher processes ignore SIGTERM/USR2 and so outlive the trainer, which restores the defaults at start
        # and, once training, stops at a step boundary after saving a checkpoint.
        code = self._run(cmd, env, preexec_fn=_ignore_stop_signals)
        record_cost(spec, self.usage, code, self.gpus_per_node)
        if spec["mode"] == "reference":
            if code != 0:
                raise RuntimeError(f"reference log-probs for {spec['config']} failed (exit code {code})")
            write_json(Path(spec["marker"]), reference_marker(spec))
            return {"mode": "reference", "config": spec["config"]}
        info = read_json(Path(spec["output_dir"]) / "run.json")
        if code == 0 and info.get("status") in ("completed", "pruned"):  # a pruned run ends itself: its slot is free
            return {"mode": "train", "output_dir": spec["output_dir"], "steps": info.get("steps"),
                    "final_eval": info.get("final_eval"), "pruned": info.get("pruned")}
        if info.get("status") == "interrupted" and "SLURM_JOB_ID" in os.environ:
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


class ScriptJob(_ProcessJob):
    """`python <code>/<script> <argv>` as a submitit job, for generate.py, judge.py and analyze_sweep.py: each skips
    what it already wrote, so a requeue after a timeout or preemption loses at most the batch in flight. On success
    the job writes the done marker, stamped with its inputs as they were when it started (or, for answers, the model
    as it is at the end)."""

    def __init__(self, code_dir: str, workdir: str, env: dict, gpus: int = 0):
        self.code_dir, self.workdir, self.env, self.gpus = code_dir, workdir, env, gpus

    def __call__(self, spec: dict) -> dict:
        script = spec["script"]
        if spec.get("made_by_sweep") and not Path(spec["model"]).expanduser().is_dir():
            raise RuntimeError(f"{spec['model']} does not exist: its training did not finish")
        marker = None
        if script == "judge.py":  # the answers as judge.py reads them: answers rewritten while it runs are not judged
            marker = judging_marker(spec["argv"], spec["inputs"])
        elif script == "analyze_sweep.py":  # the files the report is made from, as they are when it starts
            marker = analysis_marker(spec["argv"], Path(spec["sweep"]))
        errors: list[str] = []
        tees = []

        def tee(proc):
            tees.append(threading.Thread(target=_tee, args=(proc.stderr, errors), daemon=True))
            tees[0].start()
        code = self._run([sys.executable, str(Path(self.code_dir) / script), *spec["argv"]], {**os.environ, **self.env},
                         tee, stderr=subprocess.PIPE, text=True, errors="replace")
        for thread in tees:
            thread.join(timeout=10)
        record_cost(spec, self.usage, code, self.gpus)
        if code != 0:
            said = next((line for line in reversed(errors) if line.startswith("error: ")), "see the job log")
            raise RuntimeError(f"{script} for {spec.get('model') or spec['key']} ended with exit code {code}: {said}")
        if script == "generate.py":
            marker = generation_marker(spec["argv"], spec["model"])
        write_json(Path(spec["marker"]), marker)
        result = {"mode": spec["stage"], "out": spec["out"]}
        if script == "generate.py":
            result["answers"] = _lines(spec["out"])
        elif script == "judge.py":
            result["verdicts"] = _lines(spec["out"])
        return result

    def checkpoint(self, spec: dict):
        stop_tree(self._proc)  # rows already written stay; the requeued job skips them
        return submitit.helpers.DelayedSubmission(ScriptJob(self.code_dir, self.workdir, self.env, self.gpus), spec)


def _lines(path: str) -> int:
    """Complete rows in a JSONL file (without importing the project)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return sum(1 for line in fh if line.strip() and line.endswith("\n"))
    except OSError:
        return 0


# ---------------------------------------------------------------- executors and the code snapshot


def snapshot_code(out: Path) -> Path:
    """Copy the repository's source (git-tracked and untracked-but-not-ignored files) to <sweep>/code/<digest>/,
    so queued jobs run the code as it was at submission. Identical trees share one snapshot."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
        files = sorted({f for f in listed if f and (REPO / f).is_file()})
    except (OSError, subprocess.CalledProcessError):
        files = sorted(str(p.relative_to(REPO)) for pattern in ("*.py", "*.toml", "slurm/*", "configs/**/*")
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


def make_executor(kind: str, out: Path, code: Path, name: str, res, dependency: list[str] = (),
                  dependency_type: str = "afterok"):
    """A submitit executor for one group of jobs: `res` is the stage's SlurmResources; jobs start their Python with
    the code snapshot first on its path (so the job classes unpickled are the snapshot's too)."""
    python = f"env PYTHONPATH={shlex.quote(str(code))} {shlex.quote(sys.executable)}"
    extra = {}
    if kind == "slurm":
        extra = {"slurm_max_num_timeout": res.max_num_timeout, "slurm_python": python}  # constructor only (1.5)
    elif kind == "local":
        extra = {"local_python": python}
    executor = submitit.AutoExecutor(folder=out / "submitit", cluster=kind, **extra)
    params = dict(timeout_min=res.timeout_min, cpus_per_task=res.cpus_per_task, mem_gb=res.mem_gb, tasks_per_node=1,
                  name=f"dpo-{name}")
    if kind == "slurm":
        additional = dict(res.additional)
        if dependency:  # a failed stage cancels its dependants instead of leaving them pending forever
            additional.update(dependency=f"{dependency_type}:" + ":".join(dependency), kill_on_invalid_dep="yes")
        params.update(nodes=res.nodes, gpus_per_node=res.gpus_per_node, slurm_partition=res.partition,
                      slurm_account=res.account, slurm_qos=res.qos, slurm_constraint=res.constraint,
                      slurm_signal_delay_s=res.signal_delay_s, slurm_setup=list(res.setup),
                      slurm_array_parallelism=res.array_parallelism, slurm_additional_parameters=additional)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    if kind == "local":  # time to checkpoint before the local controller kills a run at its time limit (AutoExecutor
        executor._executor.update_parameters(signal_delay_s=res.signal_delay_s)  # does not pass this one through)
    return executor


def resources(base, **changes):
    """`base` (SlurmResources) with some fields replaced."""
    return dataclasses.replace(base, **changes)


def failure_line(error: Exception) -> str:
    """The line of a failed job's error that says what went wrong (submitit's message ends with log paths)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception): ", line)), lines[-1])
