"""The dry run end to end as a user runs it: real config, real data, real tokenizer; bad input exits 2 cleanly."""
import json

import pytest

import train_dpo
from dpo_loss import LOSSES
from objectives import SPECS
from conftest import run_main


def run(*args):
    return run_main(train_dpo.main, *args)


def test_default_config_dry_run():
    result = run("--config", "configs/default.yaml", "--dry-run", "data.max_pairs=0", "data.eval_fraction=0.05")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "records read: 2312" in out and "pairs kept: 2303" in out
    assert "dropped (bad record) empty_field: 4" in out and "dropped (bad record) prompt_mismatch: 5" in out
    assert "split (data.split_seed=0, data.eval_fraction=0.05): train 2188, eval 115" in out
    assert "masked from the loss" in out and "<|im_start|>assistant" in out
    assert "nothing was trained" in out


def test_default_config_as_shipped():
    result = run("--config", "configs/default.yaml", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "pairs kept: 400" in result.stdout and "train 200, eval 200" in result.stdout  # >= 200 held out


def test_dry_run_with_overrides_changes_the_split():
    result = run("--config", "configs/default.yaml", "--dry-run", "data.max_pairs=100", "data.eval_fraction=0.2")
    assert result.returncode == 0, result.stderr
    assert "train 80, eval 20" in result.stdout


def test_bad_inputs_exit_2_with_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n{oops\n")
    cases = [
        (["--config", "configs/default.yaml", "--dry-run", f"data.path={bad}", "data.format=auto",
          "data.on_bad_record=error"], "bad.jsonl:2: malformed JSON"),
        (["--config", "configs/default.yaml", "--dry-run", "loss.bet=1"], "did you mean 'loss.beta'"),
        (["--config", "configs/default.yaml", "--dry-run", "model.path=models/absent"], "models/absent"),
        (["--config", "configs/nothing.yaml", "--dry-run"], "config file not found"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("loss_type", list(LOSSES))
def test_dry_run_validates_every_objective(loss_type):
    """configs/default.yaml with loss.type=X: accepted and described (exo_pair needs loss.label_smoothing > 0 and
    says so in one line: its refusal is checked too)."""
    result = run("--config", "configs/default.yaml", "--dry-run", "data.max_pairs=8", f"loss.type={loss_type}")
    if loss_type == "exo_pair":
        assert result.returncode == 2 and "loss.label_smoothing: must be > 0 with loss.type exo_pair" in result.stderr
        result = run("--config", "configs/default.yaml", "--dry-run", "data.max_pairs=8", "loss.type=exo_pair",
                     "loss.label_smoothing=1e-3")
    assert result.returncode == 0, result.stderr
    reference = "cached reference log-probs" if SPECS[loss_type].reference else "no reference"
    assert f"loss: dpo {loss_type}" in result.stdout and f"({reference})" in result.stdout
