"""pipeline.py without a cluster: the executor choice, the stage order, bad input. The whole loop itself runs on the
real local Slurm cluster in tests/test_sweep.py (finished_sweep and the pipeline tests beside it)."""
import os
import subprocess
import sys

from conftest import REPO

import pipeline

SWEEP = "configs/sweep_tiny.yaml"


def run(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_auto_executor_falls_back_to_local_processes_without_a_controller(tmp_path):
    conf = tmp_path / "slurm.conf"  # sinfo reads a config naming a controller that does not exist
    conf.write_text("ClusterName=nowhere\nSlurmctldHost=nowhere-host\nNodeName=x CPUs=1\nPartitionName=p Nodes=x\n")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        executor, why = pipeline.choose_executor("auto")
    finally:
        os.environ.pop("SLURM_CONF") if previous is None else os.environ.__setitem__("SLURM_CONF", previous)
    assert executor == "local" and why
    assert pipeline.choose_executor("debug") == ("debug", "as asked")


def test_status_of_a_new_sweep_shows_every_stage_to_do(tmp_path):
    result = run("--config", SWEEP, f"root={tmp_path}", "--status")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:]}
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
    sweep = pipeline.sw.load_sweep(SWEEP, [f"root={tmp_path}", f"judge.judge_model={target}"])
    jobs = pipeline.sw.build_plan(sweep, SWEEP)
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


def test_the_whole_loop_on_local_processes_then_a_second_run_that_skips_everything(tmp_path):
    """What `make demo` does where no Slurm answers: the stages one after another in a worker thread while the main
    thread prints progress, the report at the end; a second run submits nothing and leaves the report alone."""
    args = ["--config", SWEEP, f"root={tmp_path}", f"report={tmp_path}/report", "--executor", "local",
            "--progress-s", "2", "judge.calibrate=[]", "generate.limit=2"]
    first = run(*args)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    for stage in pipeline.STAGES[1:]:
        assert f"stage {stage}" in first.stdout
    assert any("dpo 0/2 (beta" in line for line in first.stdout.splitlines()), "progress while the runs train"
    assert "every stage finished" in first.stdout
    report = tmp_path / "report" / "README.md"
    written, record = report.stat().st_mtime_ns, (tmp_path / "sweep_tiny" / "sweep.json").read_text()
    second = run(*args)
    assert second.returncode == 0 and "to do:" not in second.stdout, second.stdout + second.stderr
    assert report.stat().st_mtime_ns == written and (tmp_path / "sweep_tiny" / "sweep.json").read_text() == record
