"""The sweep launcher (slurm/sweep.py): the sweep file and its plan, the job command lines, and the whole loop on a
real Slurm on localhost (slurm/local_cluster.sh, with slurmdbd, so sacct is the real one): the session's one tiny
Slurm sweep (conftest.slurm_sweep, made by pipeline.py) read by the sweep, pipeline and analysis tests here, then
re-submission, --redo, preemption and cancellation. Tiny random Llama, a few steps per run. The local and debug
executors run the same sweep file in tests/test_pipeline.py.

`make test` brings the cluster up before pytest and down after it; run alone, the `cluster` fixture starts it and
stops it again at the end (only if it started it).
"""
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

import generate
import pipeline
import train_dpo
from config import ConfigError
from conftest import REPO, SWEEP, analyse_without_torch, record, run_main, sacct, wait_for_jobs
from jsonl import read_jsonl
from slurm import jobs as job_code
from slurm import scheduler, sweep
from slurm.spec import grid_runs, load_sweep, needs_reference
from slurm.stages import Plan, Target, settle



def table_lines(stdout: str) -> list[str]:
    """A --status table's lines, without the cost line that ends it."""
    return [line for line in stdout.splitlines() if not line.startswith("cost so far: ")]


def launcher(*args) -> subprocess.CompletedProcess:
    """slurm/sweep.py's main(argv), in this process."""
    return run_main(sweep.main, *args)


# ---------------------------------------------------------------- the sweep file and the plan (no cluster)


def write_sweep(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("sweep_*.yaml")), ids=lambda p: p.name)
def test_every_sweep_config_loads_and_expands(path, tmp_path):
    assert path.read_text().startswith("# "), "every config starts with a comment giving its command"
    loaded = load_sweep(path, [f"root={tmp_path}"])
    plan = Plan(loaded, str(path))
    runs = plan.stage("dpo")
    n_grid = 1
    for values in loaded.grid.values():
        n_grid *= len(values)
    trained = plan.stage("sft") + runs
    assert len(runs) == n_grid and len({t.config.output_dir for t in trained}) == len(trained)
    assert all(t.config.loss.name == "dpo" for t in runs)
    assert all(t.config.model.path == str(loaded.folder / "sft" / "final") for t in runs)
    assert [t.key for t in plan.stage("reference")] == ["reference-0"]
    targets = plan.stage("generate")  # GenerateArgs checks the arguments, as generate.py's command line does
    assert [t.name for t in targets] == ["base"] * loaded.generate.base + ["sft", *(t.key for t in runs)]
    assert all(t.out == loaded.folder / "generations" / f"{t.name}.jsonl" for t in targets)
    judging = plan.stage("judge")  # and JudgeArgs the judge's
    assert [t.name for t in judging] == ["calibration", *(t.key for t in runs)]
    assert all("--calibration" in t.spec["argv"] for t in judging[1:])
    assert not (loaded.folder / "configs" / "heldout.yaml").exists(), "planning writes nothing"


def test_default_sweep_has_three_betas_on_smollm2():
    loaded = load_sweep(REPO / "configs" / "sweep_default.yaml")
    jobs = [t for t in Plan(loaded, "configs/sweep_default.yaml").targets if t.job is not None]
    assert [j.key for j in jobs] == ["sft", "reference-0", "beta0.05_seed0", "beta0.1_seed0", "beta0.5_seed0"]
    assert jobs[0].config.loss.name == "sft" and jobs[0].config.output_dir == "logs/default/sft"
    assert jobs[0].config.model.path == "models/smollm2-135m-instruct"
    assert jobs[2].config.model.path == "logs/default/sft/final" and jobs[2].config.loss.beta == 0.05
    assert jobs[2].config.loss.ref_cache_dir == "logs/default/ref_cache"


def test_run_names_are_readable_and_deterministic(tmp_path):
    path = write_sweep(tmp_path, "name: s\nbase: configs/tiny.yaml\ngrid:\n  loss.type: [sigmoid, ipo]\n"
                                 "  loss.beta: [0.1, 1.0e-2]\n  train.lr: [5.0e-7]\n")
    names = [name for name, _ in grid_runs(load_sweep(path))]
    assert names == ["sigmoid_beta0.1_lr5e-07", "sigmoid_beta0.01_lr5e-07", "ipo_beta0.1_lr5e-07",
                     "ipo_beta0.01_lr5e-07"]
    assert names == [name for name, _ in grid_runs(load_sweep(path))]


def test_simpo_runs_need_no_reference_job(tmp_path):
    path = write_sweep(tmp_path, "name: s\nbase: configs/tiny.yaml\ngrid:\n  loss.type: [simpo]\n")
    assert [t.stage for t in Plan(load_sweep(path), str(path)).targets if t.job] == ["sft", "dpo"]


@pytest.mark.parametrize("text, message", [
    ("name: s\nbase: configs/tiny.yaml\ngrid: {loss.beta: [0.1]}\nslurm: {partitoin: gpu}\n",
     "slurm.partitoin: unknown sweep key"),
    ("name: s\nbase: configs/tiny.yaml\ngrid: {loss.beta: []}\n", "grid.loss.beta: expected a non-empty list"),
    ("name: s\nbase: configs/tiny.yaml\ngrid: {output_dir: [a, b]}\n", "grid.output_dir: is set by the launcher"),
    ("name: s\nbase: configs/tiny.yaml\ngrid: {model.path: [a]}\n", "set sft.path"),
    ("name: s/t\nbase: configs/tiny.yaml\ngrid: {loss.beta: [0.1]}\n", "name: must be a non-empty folder name"),
    ("name: s\nbase: configs/tiny.yaml\ngrid: {loss.beta: [0.1]}\nslurm: {nodes: 0}\n", "slurm.nodes: must be at least 1"),
    ("name: s\nbase: configs/tiny.yaml\ngrid: {loss.beta: [0.1]\n", r"sweep.yaml line \d+: not valid YAML"),
    ("name: s\nbase: configs/tiny.yaml\ngrid: {train.resume: [never]}\n", "grid.train.resume: is set by the launcher"),
    ("name: s\nbase: configs/tiny.yaml\ngrid: {loss.beta: [0.1]}\nsft: {slurm: {timeout: 30}}\n",
     "sft.slurm.timeout: unknown sweep key"),
    ("name: s\nbase: configs/tiny.yaml\ngrid: {loss.beta: [0.1]}\nlaunch: {env: {A: [1]}}\n",
     "launch.env.A: expected a string or number"),
    ("name: s\nbase: configs/nope.yaml\ngrid: {loss.beta: [0.1]}\n", "configs/nope.yaml: config file not found"),
])
def test_bad_sweep_files_name_the_file_and_key(tmp_path, text, message):
    path = write_sweep(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        Plan(load_sweep(path), str(path))
    assert str(path) in str(info.value)


def test_a_judge_panel_and_a_labelled_file_in_the_sweep(tmp_path):
    """judge.panel becomes judge.py's --judge-model/--template lists; pairs:FILE is made absolute from where the
    sweep is launched (its jobs run elsewhere) and is an input of the calibration (a changed file: judged again)."""
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"prompt": "q", "response_a": "a", "response_b": "b", "label": "tie"}\n')
    path = write_sweep(tmp_path, f"name: s\nbase: {REPO}/configs/tiny.yaml\ngrid: {{loss.beta: [0.1]}}\njudge:\n  panel:\n"
                                 "    - {judge_model: models/a, template: mt-bench-v2}\n    - {judge_model: models/b}\n"
                                 f"  calibrate: [llmbar:Natural, 'pairs:{labels.name}:label=label']\n"
                                 f"  panel_combine: majority\n")
    with contextlib.chdir(tmp_path):
        plan = Plan(load_sweep(path, [f"root={tmp_path}"]), str(path))
        calibration = plan.stage("judge")[0]
    argv = calibration.spec["argv"]
    assert argv[argv.index("--judge-model") + 1:argv.index("--judge-model") + 3] == ["models/a", "models/b"]
    assert argv[argv.index("--template") + 1:argv.index("--template") + 3] == ["mt-bench-v2", "hh-v1"]
    assert argv[argv.index("--panel-combine") + 1] == "majority"
    assert f"pairs:{labels.resolve()}:label=label" in argv
    assert calibration.spec["inputs"] == [str(labels.resolve())]
    for text, message in [("  panel: [{judge_model: a, templat: hh-v1}]\n", r"judge.panel\[0\].templat: is not a panel key"),
                          ("  panel: [{template: hh-v1}]\n", r"judge.panel\[0\].judge_model: names no judge"),
                          ("  judge_model: x\n  panel: [{judge_model: a}]\n", "judge.panel: names the judges"),
                          ("  panel: [{judge_model: a}, {judge_model: a}]\n", "names a judge twice")]:
        bad = write_sweep(tmp_path, "name: s\nbase: configs/tiny.yaml\ngrid: {loss.beta: [0.1]}\njudge:\n" + text)
        with pytest.raises(ConfigError, match=message):
            Plan(load_sweep(bad), str(bad))


@pytest.mark.parametrize("text, message", [
    ("generate: {args: [--turns, three]}\n", "generate: .*argument --turns: invalid choice: 'three'"),
    ("generate: {engine: fast}\n", "generate: .*argument --engine: invalid choice: 'fast'"),
    ("generate: {n: 4}\n", "generate: .*--n > 1 with --temperature 0"),
    ("generate: {slurm: {gpus: 1}}\n", "generate.slurm.gpus: unknown sweep key"),
    ("judge: {mode: vote}\n", "judge: .*argument --mode: invalid choice: 'vote'"),
    ("judge: {args: [--concurrency, 0]}\n", "judge: .*--concurrency must be >= 1"),
    ("judge: {judges: 2}\n", "judge.judges: unknown sweep key"),
    ("grid: {data.max_pairs: [32, 64]}\n", "generate.prompts: heldout: sft and max_pairs32 hold out different pairs"),
])
def test_bad_generation_settings_name_the_key(tmp_path, text, message):
    base = "name: s\nbase: configs/tiny.yaml\n" + ("" if text.startswith("grid") else "grid: {loss.beta: [0.1]}\n")
    path = write_sweep(tmp_path, base + text)
    with pytest.raises(ConfigError, match=message):
        Plan(load_sweep(path), str(path))


def test_bad_training_key_in_the_grid_names_the_run(tmp_path):
    path = write_sweep(tmp_path, "name: s\nbase: configs/tiny.yaml\ngrid: {loss.bta: [0.1]}\n")
    with pytest.raises(ConfigError, match=r"sweep.yaml: run bta0.1: .*loss.bta: unknown config key.*loss.beta"):
        Plan(load_sweep(path), str(path))


def test_a_malformed_override_is_an_error_not_a_traceback():
    with pytest.raises(ConfigError, match="grid.loss.beta=\\[0.1'.*not valid YAML"):
        load_sweep(REPO / SWEEP, ["grid.loss.beta=[0.1"])


class FakeJobEnvironment:
    """A fake of submitit.JobEnvironment on node 1 of a 2-node Slurm job: multi-node cannot run on one machine."""
    num_nodes, node, hostnames = 2, 1, ["gpu-a01", "gpu-a02"]


@pytest.mark.parametrize("deepspeed", [None, "configs/accelerate/zero2.json"])
def test_multi_node_command_ranks_nodes_and_shares_a_port(monkeypatch, deepspeed):
    monkeypatch.setattr(job_code.submitit, "JobEnvironment", FakeJobEnvironment)
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "64")
    launch = {"cpu_processes": 1, "deepspeed_config": deepspeed, "env": {"NCCL_DEBUG": "WARN"}, "local_parallelism": 1}
    job = job_code.TrainJob("/snap", "/work", gpus_per_node=8, launch=launch, grace_s=60)
    cmd, env = job.command({"config": "/c.yaml", "mode": "train", "mixed_precision": "bf16"})
    flags = {a: b for a, b in zip(cmd, cmd[1:]) if a.startswith("--")}
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert (flags["--num_processes"], flags["--num_machines"], flags["--machine_rank"]) == ("16", "2", "1")
    assert flags["--main_process_ip"] == "gpu-a01" and flags["--main_process_port"] == str(20000 + 123456 % 20000)
    assert flags["--num_cpu_threads_per_process"] == "8"  # 64 cores of the node shared by its 8 processes
    assert cmd[-3:] == ["/snap/train_dpo.py", "--config", "/c.yaml"]
    assert env["NCCL_DEBUG"] == "WARN" and env["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGINT"
    assert "ACCELERATE_USE_CPU" not in env
    if deepspeed:
        assert cmd[cmd.index("--deepspeed_multinode_launcher") + 1] == "standard" and "--multi_gpu" not in cmd
    else:
        assert "--multi_gpu" in cmd


def test_command_line_overrides_reach_grid_and_resources(tmp_path):
    loaded = load_sweep(REPO / SWEEP, ["grid.loss.beta=[0.2,0.3,0.4]", "slurm.partition=gpu",
                                       "overrides.train.max_steps=7", f"root={tmp_path}"])
    trained = [t for t in Plan(loaded, SWEEP).targets if t.job is not None]
    assert loaded.slurm.partition == "gpu"
    assert [t.key for t in trained if t.stage == "dpo"] == ["beta0.2_seed0", "beta0.3_seed0", "beta0.4_seed0"]
    assert all(t.config.train.max_steps == 7 and t.config.output_dir.startswith(str(tmp_path)) for t in trained)


def test_dry_run_prints_the_plan_and_submits_nothing(tmp_path):
    result = launcher("--config", SWEEP, "--dry-run", f"root={tmp_path}")
    assert result.returncode == 0, result.stderr
    for line in ("SUBMIT sft", "SUBMIT reference reference-0", "SUBMIT dpo       beta0.1_seed0", "dry run: nothing submitted"):
        assert line in result.stdout
    assert not (tmp_path / "sweep_tiny").exists()


def test_slurm_executor_without_sbatch_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # the venv only: no sbatch
    result = launcher("--config", SWEEP, f"root={tmp_path}")
    assert result.returncode == 2 and "sbatch not found" in result.stderr and "--executor local" in result.stderr


# ---------------------------------------------------------------- on the real local Slurm cluster


def run_pipeline(*args) -> subprocess.CompletedProcess:
    return run_main(pipeline.main, *args)


@pytest.mark.cluster
@pytest.mark.slow
def test_slurm_sweep_runs_sft_reference_and_one_array(slurm_sweep):
    root, output, states = slurm_sweep
    out = root / "sweep_tiny"
    assert {k: v for k, v in states.items() if not k.startswith(("generate/", "judge/", "analyze"))} == {
        "sft": "COMPLETED", "reference-0": "COMPLETED", "beta0.1_seed0": "COMPLETED", "beta0.5_seed0": "COMPLETED"}
    jobs = record(root, "sweep_tiny")["jobs"]
    array_ids = [jobs[r]["job_id"] for r in ("beta0.1_seed0", "beta0.5_seed0")]
    assert {i.split("_")[0] for i in array_ids} == {array_ids[0].split("_")[0]}, "both runs in one job array"
    assert sorted(i.split("_")[1] for i in array_ids) == ["0", "1"]
    # sacct, the real accounting database, agrees
    rows = dict(sacct(jobs["sft"]["job_id"], jobs["reference-0"]["job_id"], array_ids[0].split("_")[0]))
    assert all(rows[i] == "COMPLETED" for i in [jobs["sft"]["job_id"], jobs["reference-0"]["job_id"], *array_ids])
    assert f"after {jobs['sft']['job_id']}" in output  # stages chained with dependencies
    for run in ("beta0.1_seed0", "beta0.5_seed0"):
        info = json.loads((out / run / "run.json").read_text())
        assert info["status"] == "completed" and (out / run / "final" / "config.json").is_file()
        assert info["slurm"]["SLURM_ARRAY_JOB_ID"] == array_ids[0].split("_")[0]
        assert info["reference"]["cache"] == "hit" and info["reference"]["forward_passes"] == 0
        rows = read_jsonl(out / run / "metrics.jsonl")
        assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
        assert {"loss", "rewards/margins", "rewards/accuracies"} <= set(rows[-1])
    assert len(list((out / "ref_cache").glob("*.pt"))) == 1, "reference log-probs computed once for the sweep"
    sft_info = json.loads((out / "sft" / "run.json").read_text())
    assert sft_info["status"] == "completed" and sft_info["loss"] == "sft"
    betas = {yaml.safe_load((out / r / "config.yaml").read_text())["loss"]["beta"] for r in ("beta0.1_seed0", "beta0.5_seed0")}
    assert betas == {0.1, 0.5}


@pytest.mark.cluster
@pytest.mark.slow
def test_jobs_run_the_code_snapshot_taken_at_submission(slurm_sweep):
    root, _, _ = slurm_sweep
    out = root / "sweep_tiny"
    (snapshot,) = (out / "code").iterdir()
    assert (snapshot / "train_dpo.py").read_bytes() == (REPO / "train_dpo.py").read_bytes()
    sft_job = record(root, "sweep_tiny")["jobs"]["sft"]["job_id"]
    log = (out / "submitit" / f"{sft_job}_0_log.out").read_text()
    assert f"{snapshot}/train_dpo.py --config {out}/configs/" in log
    generation_job = record(root, "sweep_tiny")["jobs"]["generate/sft"]["job_id"]
    assert f"{snapshot}/generate.py --model" in (out / "submitit" / f"{generation_job}_0_log.out").read_text()


@pytest.mark.cluster
@pytest.mark.slow
def test_generation_waits_for_training_then_answers_for_every_model(slurm_sweep):
    root, output, states = slurm_sweep
    out = root / "sweep_tiny"
    jobs = record(root, "sweep_tiny")["jobs"]
    models = ("sft", "beta0.1_seed0", "beta0.5_seed0")
    assert all(states[f"generate/{m}"] == "COMPLETED" for m in models), states
    generation_ids = {jobs[f"generate/{m}"]["job_id"].split("_")[0] for m in models}
    assert len(generation_ids) == 1, "one array for the models"
    assert f"submitted generation for 3 model(s) as array job {generation_ids.pop()} (after training jobs" in output
    prompt_ids = [p.id for p in generate.load_prompts([f"heldout:{out}/configs/heldout.yaml", "mt_bench"], "m", limit=4)]
    assert len(prompt_ids) == 8
    fingerprints = set()
    for m in models:
        rows = read_jsonl(out / "generations" / f"{m}.jsonl")
        assert [r["prompt_id"] for r in sorted(rows, key=lambda r: prompt_ids.index(r["prompt_id"]))] == prompt_ids
        assert {r["model_name"] for r in rows} == {m} and {r["engine"] for r in rows} == {"hf"}
        assert rows[0]["model"] == str(out / m / "final")
        fingerprints.add(rows[0]["model_fingerprint"])
        assert (out / "generations" / f"{m}.done.json").is_file()
    assert len(fingerprints) == 3, "each model answered, not one model three times"
    again = launcher("--config", SWEEP, f"root={root}", "--generate")
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr
    table = launcher("--config", SWEEP, f"root={root}", "--generate", "--status")
    header, *lines = table_lines(table.stdout)
    assert header.split() == ["model", "job", "state", "answers", "done", "file"]
    assert {line.split()[0]: line.split()[2:5] for line in lines} == {
        m: ["COMPLETED", str(len(prompt_ids)), "yes"] for m in models}


@pytest.mark.cluster
@pytest.mark.slow
def test_judging_waits_for_generation_then_judges_every_run_with_the_calibration(slurm_sweep):
    root, output, states = slurm_sweep
    out = root / "sweep_tiny"
    jobs = record(root, "sweep_tiny")["jobs"]
    assert {k: v for k, v in states.items() if k.startswith("judge/")} == {
        "judge/calibration": "COMPLETED", "judge/beta0.1_seed0": "COMPLETED", "judge/beta0.5_seed0": "COMPLETED"}
    calibration_job = jobs["judge/calibration"]["job_id"]
    assert f"(after jobs {calibration_job}, " in output or f", {calibration_job}" in output, output
    cal = json.loads((out / "judgments" / "calibration.summary.json").read_text())["calibration"]
    assert cal["pairs"] == 9 and cal["judgments"] == 18 and cal["errors"] == 0
    assert set(cal["sets"]) == {"llmbar:Natural", f"heldout:{out}/configs/heldout.yaml",
                                f"pairs:{REPO / 'tests/data/labelled_pairs.jsonl'}"}, "the file's path made absolute"
    assert cal["kappa_ci"] is None or len(cal["kappa_ci"]) == 2
    for run in ("beta0.1_seed0", "beta0.5_seed0"):
        s = json.loads((out / "judgments" / f"{run}.summary.json").read_text())
        assert s["n"] == 8 and s["candidate"]["model_name"] == run and s["baseline"]["model_name"] == "sft"
        assert s["wins"] + s["losses"] + s["ties"] + s["errors"] == 8 and s["win_rate_ci"] is not None
        assert s["calibration"]["agreement"] == cal["agreement"], "the win rate carries the judge's agreement"
        assert [m["name"] for m in s["panel"]["members"]] == ["smollm2-135m-instruct@hh-v1",
                                                              "smollm2-135m-instruct@mt-bench-v2"]
        assert len(s["calibration"]["panel"]["members"]) == 2, "the calibration's judges, carried along"
        rows = read_jsonl(out / "judgments" / f"{run}.jsonl")
        assert len(rows) == 16 and {r["judge_model"] for r in rows} == {"models/smollm2-135m-instruct"}
        assert {r["template"] for r in rows} == {"hh-v1", "mt-bench-v2"}, "a panel of two: each judged on its own"
    again = launcher("--config", SWEEP, f"root={root}", "--judge")
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr
    table = launcher("--config", SWEEP, f"root={root}", "--judge", "--status")
    header, *lines = table_lines(table.stdout)
    assert header.split()[:5] == ["target", "job", "state", "done", "win_rate"]
    assert {line.split()[0]: line.split()[2:4] for line in lines} == {
        t: ["COMPLETED", "yes"] for t in ("calibration", "beta0.1_seed0", "beta0.5_seed0")}


@pytest.mark.cluster
@pytest.mark.slow
def test_analysis_of_the_real_tiny_sweep(slurm_sweep, tmp_path):
    """analyze_sweep.py on what the sweep wrote on the local Slurm cluster: every run in the table, the win rates
    equal judge.py's summaries, every figure drawn, torch never imported."""
    root, _, _ = slurm_sweep
    out = root / "sweep_tiny"
    result = analyse_without_torch("--sweep", out, "--out", tmp_path / "report", "--bootstrap", "200")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{out}: 3 run(s) (2 DPO), 2 judged against SFT" in result.stdout
    import pandas as pd

    table = pd.read_csv(tmp_path / "report" / "summary.csv").set_index("run")
    assert list(table.index) == ["sft", "beta0.1_seed0", "beta0.5_seed0"]
    assert set(table["status"]) == {"completed"} and set(table["steps"]) == {4}
    for run in ("beta0.1_seed0", "beta0.5_seed0"):
        summary = json.loads((out / "judgments" / f"{run}.summary.json").read_text())
        assert table.loc[run, "win_rate"] == pytest.approx(summary["win_rate"], abs=1e-4)
        assert [table.loc[run, "win_rate_ci_low"], table.loc[run, "win_rate_ci_high"]] == \
            pytest.approx(summary["win_rate_ci"], abs=1e-4)
        assert table.loc[run, "judged"] == summary["n"] == len(summary["judged_pairs"]) == 8
        assert table.loc[run, "judging"] == "complete"  # read through the summary's judged_pairs
        for column in ("first_position_rate", "consistency"):  # None when every answer pair was identical
            expected = summary[column]
            assert pd.isna(table.loc[run, column]) if expected is None else \
                table.loc[run, column] == pytest.approx(expected, abs=1e-4)
        final = json.loads((out / run / "run.json").read_text())["final_eval"]
        assert table.loc[run, "eval_accuracy"] == pytest.approx(final["rewards/accuracies"])
        assert table.loc[run, "eval_kl"] == pytest.approx(final["kl"])
        assert pd.notna(table.loc[run, "lc_win_rate"]) and pd.notna(table.loc[run, "bt_score"])
        assert table.loc[run, "weighted_win_rate"] == pytest.approx(summary["weighted_win_rate"], abs=1e-4)
        assert pd.notna(table.loc[run, "bt_sc_score"]) and pd.notna(table.loc[run, "detectable"])
    for name in ("curves_train", "curves_eval", "final_vs_beta", "win_rate_vs_beta", "kl_win_rate_frontier",
                 "judge_diagnostics"):
        assert (tmp_path / "report" / "figures" / f"{name}.png").stat().st_size > 10_000
        assert (tmp_path / "report" / "figures" / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    report = (tmp_path / "report" / "README.md").read_text()
    assert "configs/sweep_tiny.yaml" in report and "β ∈ {0.1, 0.5}" in report
    assert "### Judge calibration" in report and "| pairs:labelled_pairs.jsonl | 3 |" in report
    assert "### Judge panel" in report and "### How many prompts" in report


@pytest.mark.cluster
@pytest.mark.slow
def test_pipeline_ran_every_stage_on_slurm_and_showed_progress(slurm_sweep):
    root, output, states = slurm_sweep
    out = root / "sweep_tiny"
    assert "executor slurm (the Slurm controller answers)" in output  # --executor auto found the cluster
    jobs = record(root, "sweep_tiny")["jobs"]
    assert set(states.values()) == {"COMPLETED"} and "analyze" in states, states
    judge_arrays = {jobs[k]["job_id"].split("_")[0] for k in jobs if k.startswith("judge/")}
    analysis_line = next(line for line in output.splitlines() if "submitted the analysis as job" in line)
    assert all(j in analysis_line for j in judge_arrays), analysis_line  # queued behind the judging jobs
    progress = [line for line in output.splitlines() if line.startswith("[pipeline") and "| sft " in line]
    assert len(progress) >= 3, output[-3000:]  # a line whenever a stage moved
    assert "dpo 2/2 done" in progress[-1] and progress[-1].endswith("analyze done")
    assert "every stage finished" in output
    report = root / "report"
    assert "beta0.5_seed0" in (report / "README.md").read_text()
    assert (report / "figures" / "win_rate_vs_beta.png").stat().st_size > 10_000
    marker = json.loads((out / "analysis.done.json").read_text())
    assert marker == job_code.analysis_marker(["--sweep", str(out), "--out", str(report)], out)
    status = run_pipeline("--config", SWEEP, f"root={root}", f"report={report}", "--status")
    rows = {line.split()[0]: line.split()[1] for line in table_lines(status.stdout)[1:]}
    assert rows == {s: "completed" for s in ("prepare", "sft", "reference", "dpo", "generate", "judge", "analyze")}


@pytest.mark.cluster
@pytest.mark.slow
def test_pipeline_second_run_skips_every_stage(slurm_sweep):
    root, _, _ = slurm_sweep
    report = root / "report" / "README.md"
    before, written = record(root, "sweep_tiny"), report.stat().st_mtime_ns
    again = run_pipeline("--config", SWEEP, f"root={root}", f"report={root}/report")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "to do:" not in again.stdout and "every stage finished" in again.stdout
    assert "beta0.1_seed0: win rate" in again.stdout and f"report: {report}" in again.stdout
    assert record(root, "sweep_tiny") == before, "nothing submitted"
    assert report.stat().st_mtime_ns == written, "the report was not made again"


def test_judging_waits_only_on_jobs_that_will_make_its_answers(tmp_path):
    """A comparison is queued behind generation jobs queued on Slurm; answers nobody is making block it."""
    def gen(name, state):
        return Target("generate", f"generate/{name}", name, tmp_path / f"{name}.jsonl", {}, state=state, job_id="7")

    record = {"jobs": {"generate/sft": {"executor": "slurm"}, "generate/r1": {"executor": "slurm"},
                       "generate/r2": {"executor": "local"}}}
    cases = {"active on slurm": (gen("r1", "active"), "waiting"), "not submitted": (gen("r1", "waiting"), "blocked"),
             "running locally": (gen("r2", "active"), "blocked"), "answered": (gen("r1", "completed"), "submit")}
    for name, (dep, expected) in cases.items():
        target = Target("judge", "judge/r", "r", tmp_path / "v.jsonl", {}, [dep, gen("sft", "completed")])
        settle(target, None, record, {})
        assert target.state == expected, (name, target.state, target.detail)


@pytest.mark.cluster
@pytest.mark.slow
def test_status_table_shows_every_run(slurm_sweep):
    root, _, _ = slurm_sweep
    result = launcher("--config", SWEEP, f"root={root}", "--status")
    assert result.returncode == 0, result.stderr
    header, *lines = table_lines(result.stdout)
    assert header.split() == ["run", "job", "state", "run.json", "step", "eval", "loss", "accuracy", "margin",
                              "checkpoint", "note"]
    assert result.stdout.splitlines()[-1].startswith("cost so far: ")
    by_run = {line.split()[0]: line.split() for line in lines}
    assert set(by_run) == {"sft", "reference-0", "beta0.1_seed0", "beta0.5_seed0"}
    for run in ("beta0.1_seed0", "beta0.5_seed0"):
        _, _, state, status, step, loss, accuracy, margin, checkpoint, note = by_run[run]
        assert (state, status, step, checkpoint, note) == ("COMPLETED", "completed", "4/4", "final", "-")
        evaluation = [r for r in read_jsonl(root / "sweep_tiny" / run / "metrics.jsonl") if r["split"] == "eval"][-1]
        assert float(loss) == pytest.approx(evaluation["loss"], abs=1e-4)
        assert float(margin) == pytest.approx(evaluation["rewards/margins"], abs=1e-4)


@pytest.mark.cluster
@pytest.mark.slow
def test_rerun_submits_nothing_and_a_deleted_run_alone_is_resubmitted(slurm_sweep):
    root, _, _ = slurm_sweep
    before = record(root, "sweep_tiny")
    again = launcher("--config", SWEEP, f"root={root}")
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr
    assert record(root, "sweep_tiny") == before

    shutil.rmtree(root / "sweep_tiny" / "beta0.5_seed0")
    result = launcher("--config", SWEEP, f"root={root}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted 1 DPO run(s)" in result.stdout
    assert "submitted sft" not in result.stdout and "submitted reference" not in result.stdout
    after = record(root, "sweep_tiny")
    assert after["jobs"]["beta0.1_seed0"] == before["jobs"]["beta0.1_seed0"]
    assert after["jobs"]["beta0.5_seed0"]["job_id"] != before["jobs"]["beta0.5_seed0"]["job_id"]
    assert wait_for_jobs(root, "sweep_tiny")["beta0.5_seed0"] == "COMPLETED"
    assert json.loads((root / "sweep_tiny" / "beta0.5_seed0" / "run.json").read_text())["status"] == "completed"


@pytest.mark.cluster
@pytest.mark.slow
def test_what_each_slurm_job_used_is_recorded_from_sacct_and_from_the_job(slurm_sweep):
    """After the pipeline followed the sweep to its end, the sweep record holds Slurm's accounting of every job
    (sacct: elapsed, CPU time, MaxRSS, AllocTRES; one record per run of the job) and every job wrote its own line;
    --status adds up what was used."""
    root, output, _ = slurm_sweep
    out = root / "sweep_tiny"
    assert "cost so far: " in output
    again = launcher("--config", SWEEP, f"root={root}")  # a launch stores what jobs ended since (other tests' too)
    assert again.returncode == 0, again.stdout + again.stderr
    jobs = record(root, "sweep_tiny")["jobs"]
    for key, job in jobs.items():
        sacct = job.get("sacct")
        assert sacct and sacct["records"], key
        first = sacct["records"][0]
        assert first["elapsed_s"] >= 1 and first["cpus"] >= 1 and first["gpus"] == 0 and first["state"] == "COMPLETED", (key, first)
        own = [json.loads(line) for line in (out / "costs" / f"{key.replace('/', '__')}.jsonl").read_text().splitlines()]
        assert {r["executor"] for r in own} == {"slurm"} and own[-1]["cpus"] >= 1, own
        assert job["job_id"] in {r["job_id"] for r in own}, (key, job["job_id"], own)
    assert jobs["beta0.1_seed0"]["sacct"]["records"][0]["max_rss_gb"] > 0.1, "MaxRSS of the training step"
    status = launcher("--config", SWEEP, f"root={root}", "--status")
    assert re.search(rf"cost so far: \d+\.\d+ CPU-hours over {len(jobs)} job\(s\) \(sacct\)", status.stdout), status.stdout
    assert "peak RSS" in status.stdout.splitlines()[-1]


@pytest.mark.cluster
@pytest.mark.slow
def test_a_collapsing_run_is_pruned_on_slurm_and_only_retried_when_asked(cluster, tmp_path):
    """Two DPO runs on the local Slurm cluster, one driven to collapse (lr 0.05, β 5 on the tiny model): the sweep's
    prune: rule stops it at a step boundary; its array task ends itself (exit 0, COMPLETED: the slot is free), run.json
    and --status say pruned with the reason; a re-run submits nothing, --retry-pruned with the rule loosened trains it
    on from its checkpoint to the end."""
    common = ["--config", SWEEP, f"root={tmp_path}", "name=pruning", "grid.loss.beta=[5]", "grid.train.lr=[0.0001,0.05]",
              "overrides.train.max_steps=12", "overrides.train.save_every=100", "prune.patience=2"]
    result = launcher(*common, "prune.margin_below=-10")
    assert result.returncode == 0, result.stdout + result.stderr
    states = wait_for_jobs(tmp_path, "pruning")
    out = tmp_path / "pruning"
    healthy, collapsed = (json.loads((out / f"beta5_seed0_lr{lr}" / "run.json").read_text()) for lr in ("0.0001", "0.05"))
    assert states["beta5_seed0_lr0.05"] == states["beta5_seed0_lr0.0001"] == "COMPLETED", states
    assert healthy["status"] == "completed" and collapsed["status"] == "pruned"
    step = collapsed["pruned"]["step"]
    assert step < 12 and collapsed["pruned"]["reason"].startswith("margin collapse")
    assert collapsed["last_checkpoint"].endswith(f"step-{step:06d}"), "a checkpoint at the pruned step"
    status = launcher(*common, "prune.margin_below=-10", "--status")
    row = next(line for line in status.stdout.splitlines() if line.startswith("beta5_seed0_lr0.05"))
    assert " pruned " in row and "pruned: margin collapse" in row and f"{step}/12" in row, status.stdout
    again = launcher(*common, "prune.margin_below=-10")
    assert "nothing to submit" in again.stdout, again.stdout
    answers = launcher(*common, "prune.margin_below=-10", "--generate", "--dry-run")
    line = next(x for x in answers.stdout.splitlines() if "generate  beta5_seed0_lr0.05" in x)
    assert "  skip   generate" in line and "skipped: its run was pruned at step" in line, answers.stdout
    retried = launcher(*common, "prune.margin_below=-1.0e9", "--retry-pruned")
    assert "submitted 1 DPO run(s)" in retried.stdout, retried.stdout + retried.stderr
    assert wait_for_jobs(tmp_path, "pruning")["beta5_seed0_lr0.05"] == "COMPLETED"
    resumed = json.loads((out / "beta5_seed0_lr0.05" / "run.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_from"].endswith(f"step-{step:06d}")


@pytest.mark.cluster
@pytest.mark.slow
def test_a_changed_config_over_a_finished_run_is_refused(slurm_sweep):
    root, _, _ = slurm_sweep
    result = launcher("--config", SWEEP, f"root={root}", "overrides.train.lr=0.002")
    assert result.returncode == 2
    assert "beta0.1_seed0 holds a run of a different config (train.lr: 0.001 -> 0.002)" in result.stderr


@pytest.mark.cluster
@pytest.mark.slow
def test_pipeline_redo_sets_a_stage_and_everything_after_it_aside(slurm_sweep):
    """The last test on the finished sweep: --redo generate --stage generate moves answers, verdicts and the report's
    record to replaced/<time>/ (nothing deleted) and answers again; judge and analyze are then to do."""
    root, _, _ = slurm_sweep
    out = root / "sweep_tiny"
    answers = sorted(p.name for p in (out / "generations").iterdir())
    refused = run_pipeline("--config", SWEEP, f"root={root}", "--redo", "dpo", "--stage", "judge", "--executor", "local")
    assert refused.returncode == 2 and "--redo dpo makes dpo again: add --stage dpo" in refused.stderr
    assert not (out / "replaced").exists(), "nothing moved before the refusal"
    result = run_pipeline("--config", SWEEP, f"root={root}", f"report={root}/report", "--redo", "generate",
                      "--stage", "generate", "--executor", "local")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (moved,) = (out / "replaced").iterdir()
    assert sorted(p.name for p in (moved / "generations").iterdir()) == answers
    assert (moved / "judgments" / "calibration.summary.json").is_file() and (moved / "analysis.done.json").is_file()
    assert (out / "beta0.1_seed0" / "final").is_dir()  # training stays
    assert all(read_jsonl(out / "generations" / f"{m}.jsonl") for m in ("sft", "beta0.1_seed0", "beta0.5_seed0"))
    status = run_pipeline("--config", SWEEP, f"root={root}", f"report={root}/report", "--status")
    rows = {line.split()[0]: line.split()[1] for line in table_lines(status.stdout)[1:]}
    assert rows["dpo"] == rows["generate"] == "completed" and rows["judge"] == rows["analyze"] == "todo", status.stdout


@pytest.mark.cluster
@pytest.mark.slow
def test_preempted_run_requeues_and_ends_as_an_uninterrupted_run(cluster, tmp_path):
    """submitit's own preemption (scancel --signal TERM, then USR2): the job checkpoints, requeues and resumes;
    its final metrics and weights equal those of the same config run without interruption."""
    import submitit

    args = ["--config", SWEEP, f"root={tmp_path}", "name=preempt", "sft.path=models/tiny-llama",
            "grid.loss.beta=[0.1]", "overrides.train.max_steps=40", "overrides.train.save_every=0"]
    result = launcher(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "preempt" / "beta0.1_seed0"
    job_id = record(tmp_path, "preempt")["jobs"]["beta0.1_seed0"]["job_id"]
    deadline = time.time() + 300
    while len([r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]) < 5 if (
            out / "metrics.jsonl").is_file() else True:
        assert time.time() < deadline, "the run never started training"
        time.sleep(0.5)
    submitit.SlurmJob(tmp_path / "preempt" / "submitit", job_id)._interrupt()  # preemption, as submitit tests it
    assert wait_for_jobs(tmp_path, "preempt")["beta0.1_seed0"] == "COMPLETED"

    attempts = [state for _, state in sacct(job_id.split("_")[0], duplicates=True)]
    assert attempts == ["REQUEUED", "COMPLETED"], attempts
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["slurm"]["SLURM_RESTART_COUNT"] == "1"
    resumed_step = int(Path(info["resumed_from"]).name.split("-")[1])
    assert 5 <= resumed_step < 40
    train_steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    assert train_steps == list(range(1, 41)), "no step lost or logged twice across the requeue"

    config = tmp_path / "preempt" / "configs" / "beta0.1_seed0.yaml"
    plain = run_main(train_dpo.main, "--config", config, f"output_dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stderr[-2000:]
    reference = json.loads((tmp_path / "plain" / "run.json").read_text())
    for key, value in reference["final_eval"].items():
        assert info["final_eval"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert info["parameter_checksums"] == pytest.approx(reference["parameter_checksums"], rel=1e-9)


@pytest.mark.cluster
@pytest.mark.slow
def test_a_failed_stage_cancels_its_dependants_and_cancel_stops_a_sweep(cluster, tmp_path):
    args = ["--config", SWEEP, f"root={tmp_path}", "name=cancelme", "overrides.train.max_steps=100000"]

    def wait_until_sft_runs() -> dict:
        deadline = time.time() + 120
        while scheduler.scheduler_states(record(tmp_path, "cancelme"), tmp_path / "cancelme").get("sft") != "RUNNING":
            assert time.time() < deadline, "the SFT job never started"
            time.sleep(0.5)
        return record(tmp_path, "cancelme")["jobs"]

    assert launcher(*args).returncode == 0
    jobs = wait_until_sft_runs()
    subprocess.run(["scancel", jobs["sft"]["job_id"]], check=True)  # the SFT stage dies: nothing after it may run
    states = wait_for_jobs(tmp_path, "cancelme", timeout_s=120)
    assert states["sft"] == "CANCELLED"
    assert all(states[k] == "CANCELLED" for k in ("reference-0", "beta0.1_seed0", "beta0.5_seed0")), states

    resubmitted = launcher(*args)  # every stage failed, so every stage is submitted again
    assert resubmitted.returncode == 0 and "submitted sft" in resubmitted.stdout, resubmitted.stdout
    wait_until_sft_runs()
    result = launcher(*args, "--cancel")
    assert result.returncode == 0 and "cancelled Slurm job(s)" in result.stdout, result.stdout + result.stderr
    states = wait_for_jobs(tmp_path, "cancelme", timeout_s=120)
    assert set(states.values()) == {"CANCELLED"}, states
    assert "nothing queued or running" in launcher(*args, "--cancel").stdout


# ---------------------------------------------------------------- process trees


TRAINER = """import os, signal, sys, time
signal.signal(signal.SIGUSR2, lambda *a: (os.close(os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY)), os._exit(0)))
time.sleep(60)
"""
LAUNCHER = """import subprocess, sys, time
subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]], start_new_session=True)
time.sleep(60)
"""


@pytest.mark.multiprocess
def test_signals_reach_trainers_in_sessions_of_their_own(tmp_path):
    """torch's launcher starts each trainer of a multi-process run in its own session: the checkpoint signal and the
    final stop must reach them too, not only the launcher's process group."""
    (tmp_path / "trainer.py").write_text(TRAINER)
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    seen = tmp_path / "seen"

    def launch():
        proc = subprocess.Popen([sys.executable, tmp_path / "launcher.py", tmp_path / "trainer.py", seen],
                                start_new_session=True)
        deadline = time.time() + 20
        while not job_code.descendants(proc) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(3)  # the trainer's handler installed
        return proc, job_code.descendants(proc)

    proc, (trainer,) = launch()
    job_code.signal_tree(proc, signal.SIGUSR2)
    deadline = time.time() + 20
    while not seen.is_file() and time.time() < deadline:
        time.sleep(0.1)
    assert seen.is_file(), "the trainer in its own session got the checkpoint signal"
    proc.kill()
    proc, (orphan,) = launch()
    job_code.stop_tree(proc)  # SIGTERM: the trainer has no handler for it and ends
    try:
        assert orphan.status() == psutil.STATUS_ZOMBIE  # ended, waiting for init to reap it
    except psutil.NoSuchProcess:
        pass


def test_array_states_parse_from_sacct_and_squeue(monkeypatch):
    """Real sacct/squeue lines seen on the local cluster: a pending array, one cancelled before any task started
    (a single row under the array id), and a job only slurmctld knows yet. The scheduler is a fake here."""
    outputs = {"sacct": "61|CANCELLED by 0\n62_[0-1%2]|PENDING\n63|CANCELLED by 0\n",
               "squeue": "64_0|RUNNING\n64_1|PENDING\n"}
    monkeypatch.setattr(scheduler.shutil, "which", lambda name: name)
    monkeypatch.setattr(scheduler.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, outputs[cmd[0]], ""))
    states = scheduler.slurm_states(["61", "62_0", "62_1", "63_0", "63_1", "64_0", "64_1"])
    assert states == {"61": "CANCELLED", "62_0": "PENDING", "62_1": "PENDING", "63": "CANCELLED", "63_0": "CANCELLED",
                      "63_1": "CANCELLED", "64_0": "RUNNING", "64_1": "PENDING"}


def test_a_scheduler_that_does_not_answer_is_an_error_not_an_empty_queue(monkeypatch):
    monkeypatch.setattr(scheduler.shutil, "which", lambda name: name)
    monkeypatch.setattr(scheduler.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "sacct: error: Problem talking to the database: Connection refused"))
    with pytest.raises(scheduler.UserInputError, match="Connection refused.*cannot tell which jobs are still queued"):
        scheduler.slurm_states(["61"])


def test_a_grid_over_objectives_names_runs_and_gives_references_only_where_needed(tmp_path):
    path = write_sweep(tmp_path, "name: s\nbase: configs/tiny.yaml\ngrid:\n"
                                 "  loss.type: [sigmoid, ipo, apo_zero, [sigmoid, sft], orpo]\n  loss.beta: [0.1]\n")
    sweep = load_sweep(path)
    runs = grid_runs(sweep)
    assert [name for name, _ in runs] == ["sigmoid_beta0.1", "ipo_beta0.1", "apo-zero_beta0.1",
                                          "sigmoid+sft_beta0.1", "orpo_beta0.1"]
    plan = Plan(sweep, str(path))
    jobs = {t.key: t for t in plan.targets if t.job}
    assert jobs["sigmoid+sft_beta0.1"].config.loss.types == ["sigmoid", "sft"]
    assert not needs_reference(jobs["orpo_beta0.1"].config)
    referenced = {t.key for t in plan.targets if t.stage == "dpo" and any(d.stage == "reference" for d in t.deps)}
    assert referenced == {"sigmoid_beta0.1", "ipo_beta0.1", "apo-zero_beta0.1", "sigmoid+sft_beta0.1"}
