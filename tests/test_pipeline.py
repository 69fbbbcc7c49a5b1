"""pipeline.py and the launcher without a cluster: the executor choice, the stage order, bad input, and the whole loop
on submitit's local executor (pipeline.py, then slurm/sweep.py's stages on the same folder) and its debug executor.
The whole loop on the real local Slurm cluster is tests/test_sweep.py's."""
import json
import re
import shutil
import subprocess

import pytest

import pipeline
from conftest import SWEEP, run_main
from jsonl import read_jsonl
from slurm import sweep


def run(*args) -> subprocess.CompletedProcess:
    return run_main(pipeline.main, *args)


def launcher(*args):
    return run_main(sweep.main, *args)


def test_auto_executor_falls_back_to_local_processes_without_a_controller(tmp_path, monkeypatch):
    conf = tmp_path / "slurm.conf"  # sinfo reads a config naming a controller that does not exist
    conf.write_text("ClusterName=nowhere\nSlurmctldHost=nowhere-host\nNodeName=x CPUs=1\nPartitionName=p Nodes=x\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    executor, why = pipeline.choose_executor("auto")
    assert executor == "local" and why
    assert pipeline.choose_executor("debug") == ("debug", "as asked")


def test_status_of_a_new_sweep_shows_every_stage_to_do(tmp_path):
    result = run("--config", SWEEP, f"root={tmp_path}", "--status")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:] if not line.startswith("cost")}
    assert result.stdout.splitlines()[-1].startswith("cost so far: 0.000 CPU-hours over 0 job(s) (no records yet)")
    assert list(rows) == list(pipeline.STAGES)
    assert rows["prepare"] == "completed"  # setup made the tiny model and the judge
    assert {rows[s] for s in pipeline.STAGES[1:]} == {"todo"}
    assert not (tmp_path / "sweep_tiny").exists(), "--status writes nothing"


def test_a_stage_alone_needs_the_stages_before_it(tmp_path):
    result = run("--config", SWEEP, f"root={tmp_path}", "--stage", "dpo", "--executor", "local")
    assert result.returncode == 2
    assert "--stage dpo needs sft finished first (it is todo)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_model_folder_is_named_with_its_key_before_anything_runs(tmp_path):
    result = run("--config", SWEEP, f"root={tmp_path}", "judge.judge_model=models/no-such-judge", "--executor", "local")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "model folder(s) not found: models/no-such-judge (judge.judge_model)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sweep_tiny" / "sft").exists(), "no training started"


def test_prepare_builds_a_missing_tiny_model(tmp_path, monkeypatch):
    """A tiny model the sweep names but nobody built is made by the prepare stage (setup.sh makes the default one)."""
    monkeypatch.setattr(pipeline, "REPO", tmp_path)  # where the project keeps its models/
    target = tmp_path / "models" / "tiny-gpt2"
    sweep = pipeline.load_sweep(SWEEP, [f"root={tmp_path}", f"judge.judge_model={target}"])
    jobs = pipeline.st.Plan(sweep, SWEEP).jobs
    assert pipeline.prepare_state(sweep, jobs) == ("todo", f"to make: {target}")
    assert pipeline.prepare(sweep, jobs) == 0
    assert (target / "config.json").is_file() and pipeline.prepare_state(sweep, jobs)[0] == "completed"
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(target).model_type == "gpt2"


def test_redo_and_stage_names_are_checked():
    result = run("--config", SWEEP, "--redo", "everything")
    assert result.returncode == 2 and "invalid choice: 'everything'" in result.stderr
    result = run("--config", "configs/nope.yaml", "--status")
    assert result.returncode == 2 and "configs/nope.yaml" in result.stderr and "Traceback" not in result.stderr


def test_plan_prints_the_memory_of_every_training_job_and_runs_nothing(tmp_path):
    result = run("--config", "configs/sweep_mistral7b.yaml", f"root={tmp_path}", "--plan", "--gpu", "h100-80gb")
    assert result.returncode == 0, result.stderr
    assert "8 x h100-80gb" in result.stdout and "fits h100-80gb: yes" in result.stdout
    one_gpu = run("--config", "configs/sweep_mistral7b_full.yaml", f"root={tmp_path}", "--plan",
                  "slurm.nodes=1", "slurm.gpus_per_node=1")
    assert one_gpu.returncode == 0 and "fits no" in one_gpu.stdout, one_gpu.stdout + one_gpu.stderr
    assert not any(tmp_path.iterdir()), "--plan writes nothing"


# ---------------------------------------------------------------- the whole loop on the local executor


@pytest.fixture(scope="module")
def local_loop(tmp_path_factory):
    """What `make demo` does where no Slurm answers, on the tiny sweep: the stages one after another in a worker
    thread while the main thread prints progress (the jobs' own progress lines every 0.2 s here, instead of every
    20 s), the report at the end. (root, pipeline output)."""
    root = tmp_path_factory.mktemp("local")
    mp = pytest.MonkeyPatch()
    mp.setenv("DPO_PROGRESS_S", "0.2")  # the local jobs inherit it
    first = run("--config", SWEEP, f"root={root}", f"report={root}/report", "--executor", "local", "--progress-s", "2")
    mp.undo()
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    yield root, first.stdout
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_the_whole_loop_on_local_processes_then_a_second_run_that_skips_everything(local_loop):
    root, output = local_loop
    for stage in pipeline.STAGES[1:]:
        assert f"stage {stage}" in output
    assert any("dpo 0/2 (beta" in line for line in output.splitlines()), "progress while the runs train"
    relayed = [line for line in output.splitlines() if "[progress]" in line]  # from the jobs' logs
    for what in ("reference log-probs: ", "dpo train beta0.1_seed0: "):  # the tiny answers and verdicts take less
        assert any(what in line for line in relayed), (what, relayed)    # than a line's interval

    table = output[output.rindex("this run"):]  # the final stage table: every stage with its own time
    for stage in pipeline.STAGES[1:]:
        row = next(line for line in table.splitlines() if line.startswith(stage + " "))
        assert re.search(r"\b\d+m\d\ds\b", row), row
    assert "every stage finished" in output
    report = root / "report" / "README.md"
    written, record = report.stat().st_mtime_ns, (root / "sweep_tiny" / "sweep.json").read_text()
    second = run("--config", SWEEP, f"root={root}", f"report={root}/report", "--executor", "local")
    assert second.returncode == 0 and "to do:" not in second.stdout, second.stdout + second.stderr
    assert report.stat().st_mtime_ns == written and (root / "sweep_tiny" / "sweep.json").read_text() == record


@pytest.mark.slow
def test_the_launcher_on_the_local_executor_runs_each_stage_of_the_same_sweep_file(local_loop):
    """slurm/sweep.py --executor local on the folder pipeline.py made: every stage's jobs ran as local processes,
    nothing is left to do, answers deleted are made again alone, a bad prompt set fails its job with the script's
    own error line."""
    root, output = local_loop
    out = root / "sweep_tiny"
    for run_name in ("sft", "beta0.1_seed0", "beta0.5_seed0"):
        assert json.loads((out / run_name / "run.json").read_text())["status"] == "completed", run_name
        assert (out / run_name / "final" / "config.json").is_file()
    assert "beta0.5_seed0 done: eval loss" in output
    assert len(list((out / "ref_cache").glob("*.pt"))) == 1
    assert {r["executor"] for r in json.loads((out / "sweep.json").read_text())["jobs"].values()} == {"local"}
    common = ["--config", SWEEP, "--executor", "local", f"root={root}"]
    assert "nothing to submit" in launcher(*common).stdout
    assert "nothing to submit" in launcher(*common, "--judge").stdout
    assert "calibration: agreement with human labels" in output
    for run_name in ("beta0.1_seed0", "beta0.5_seed0"):
        assert f"{run_name}: win rate" in output
        assert json.loads((out / "judgments" / f"{run_name}.summary.json").read_text())["n"] == 8
    for run_name in ("sft", "beta0.1_seed0", "beta0.5_seed0"):
        rows = read_jsonl(out / "generations" / f"{run_name}.jsonl")
        assert rows and {r["model_name"] for r in rows} == {run_name}
        assert f"{run_name}: {len(rows)} answers in" in output
    (out / "generations" / "sft.jsonl").unlink()  # answers gone, marker left: answered again, alone
    redo = launcher(*common, "--generate")
    assert redo.returncode == 0 and "started generation for sft" in redo.stdout, redo.stdout + redo.stderr
    assert "started generation for beta" not in redo.stdout and read_jsonl(out / "generations" / "sft.jsonl")
    broken = launcher(*common, "--generate", "generate.prompts=[nope.jsonl]")
    assert broken.returncode == 1
    assert "generation for sft FAILED: " in broken.stdout and "generate.py for" in broken.stdout
    assert "error: --prompts nope.jsonl: no such file" in broken.stdout


@pytest.mark.slow
def test_local_jobs_record_what_they_used_and_the_report_has_a_cost_table(local_loop):
    """Every local job wrote what its processes used (costs/<key>.jsonl); --status sums it and the report tables it
    per stage and per run, with the cost of a win-rate point over SFT."""
    root, output = local_loop
    out = root / "sweep_tiny"
    keys = set(json.loads((out / "sweep.json").read_text())["jobs"])
    recorded = {json.loads(line)["key"] for path in (out / "costs").glob("*.jsonl") for line in path.read_text().splitlines()}
    assert recorded == keys, keys ^ recorded
    for path in (out / "costs").glob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:  # every attempt, the ones other tests made fail on purpose too
            assert row["executor"] == "local" and row["elapsed_s"] > 0 and row["cpus"] >= 1 and row["gpus"] == 0
            assert row["cpu_s"] > 0 and row["max_rss_gb"] > 0.05, row
        assert rows[0]["exit_code"] == 0, rows
    train = json.loads((out / "costs" / "beta0.1_seed0.jsonl").read_text().splitlines()[0])
    assert train["cpu_s"] > 1.0, "the training processes' CPU time, not the job's own"
    assert "cost so far: " in output and "CPU-hours over" in output
    status = run("--config", SWEEP, f"root={root}", f"report={root}/report", "--status")
    assert re.search(r"cost so far: \d+\.\d+ CPU-hours over \d+ job\(s\) \(job\)", status.stdout), status.stdout
    report = (root / "report" / "README.md").read_text()
    assert "### Cost" in report and "| **total** |" in report and "CPU-hours per point" in report
    for stage in ("sft", "reference", "dpo", "generate", "judge"):
        assert f"| {stage} | " in report.split("### Cost")[1], stage


@pytest.fixture(scope="module")
def wide_loop(tmp_path_factory, default_model_dir):
    """The same tiny sweep on a model 4x wider and twice as deep (a second size for the small-to-large comparison),
    judged by one template on one prompt of each set: (root, pipeline output)."""
    from models import save_tiny_model

    root = tmp_path_factory.mktemp("wide")
    model = save_tiny_model("llama", root / "tiny-llama-wide", str(default_model_dir), width=256, layers=4)
    result = run("--config", SWEEP, f"root={root}", "name=sweep_tiny_wide", f"report={root}/report", "--executor",
                 "local", f"overrides.model.path={model}", "generate.limit=1", "judge.calibrate=[]",
                 "judge.template=[hh-v1]", "--progress-s", "5")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    yield root, result.stdout
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_sweeps_of_two_model_sizes_are_compared_beta_by_beta(local_loop, wide_loop, tmp_path):
    """analyze_sweep.py --sweep small --sweep large: the β-stability map, win rate against β per model on one figure,
    and per β whether the small model's verdict held for the large one."""
    import analyze_sweep
    import pandas as pd

    small, large = local_loop[0] / "sweep_tiny", wide_loop[0] / "sweep_tiny_wide"
    result = run_main(analyze_sweep.main, "--sweep", small, "--sweep", large, "--out", tmp_path / "cmp",
                      "--bootstrap", "50")
    assert result.returncode == 0, result.stdout + result.stderr
    report = (tmp_path / "cmp" / "README.md").read_text()
    sizes = re.findall(r"tiny-llama(?:-wide)? \((sweep_tiny(?:_wide)?), ([\d.]+)M parameters\)", report)
    assert float(dict(sizes)["sweep_tiny"]) < float(dict(sizes)["sweep_tiny_wide"]), sizes
    transfer = pd.read_csv(tmp_path / "cmp" / "transfer.csv")
    assert sorted(transfer["beta"]) == [0.1, 0.5]
    for _, r in transfer.iterrows():
        assert r["stability_held"] == (r["small_stability"] == r["large_stability"])
        assert r["small_vs_sft"] in ("better", "worse", "no difference")
    per_beta = pd.read_csv(tmp_path / "cmp" / "per_beta.csv")
    assert len(per_beta) == 4 and set(per_beta["sweep"]) == {"sweep_tiny", "sweep_tiny_wide"}
    for sweep_dir, name in ((small, "sweep_tiny"), (large, "sweep_tiny_wide")):
        for beta in (0.1, 0.5):
            row = per_beta[(per_beta["sweep"] == name) & (per_beta["beta"] == beta)].iloc[0]
            final = json.loads((sweep_dir / f"beta{beta:g}_seed0" / "run.json").read_text())["final_eval"]
            assert row["eval_accuracy"] == pytest.approx(final["rewards/accuracies"])
    for heading in ("## β-stability map", "## Did the small model's verdict hold?", "## Read this first"):
        assert heading in report
    for figure in ("compare_stability_vs_beta", "compare_win_rate_vs_beta"):
        assert (tmp_path / "cmp" / "figures" / f"{figure}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_debug_executor_runs_the_same_sweep_file_in_this_process(tmp_path, local_loop):
    """submitit's debug executor: the jobs run in the launcher's own process, one after another, through every stage
    kind (here from the local loop's SFT model, one beta)."""
    root, _ = local_loop
    common = ["--config", SWEEP, "--executor", "debug", f"root={tmp_path}", f"sft.path={root}/sweep_tiny/sft/final",
              "grid.loss.beta=[0.2]", "generate.limit=1", "judge.calibrate=[]"]
    training = launcher(*common)
    assert training.returncode == 0, training.stdout[-3000:] + training.stderr[-3000:]
    out = tmp_path / "sweep_tiny"
    assert json.loads((out / "beta0.2_seed0" / "run.json").read_text())["status"] == "completed"
    assert "beta0.2_seed0 done: eval loss" in training.stdout and "started reference-0 (debug job" in training.stdout
    for stage in ("--generate", "--judge"):
        result = launcher(*common, stage)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {r["model_name"] for r in read_jsonl(out / "generations" / "beta0.2_seed0.jsonl")} == {"beta0.2_seed0"}
    assert json.loads((out / "judgments" / "beta0.2_seed0.summary.json").read_text())["n"] == 2
    assert {r["executor"] for r in json.loads((out / "sweep.json").read_text())["jobs"].values()} == {"debug"}
    assert "nothing to submit" in launcher(*common).stdout
