"""Training on tiny models with the real tokenizer and real HH data: SFT, every DPO loss, LoRA, freezing, resume,
the NaN guard, the reference cache, two processes (DDP) and DeepSpeed ZeRO-2 on CPU."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch
from safetensors.torch import load_file

import bookkeeping
import train_dpo
from conftest import free_port, run_main
from config import load_config
from jsonl import read_jsonl
from dpo_loss import LOSSES
from models import save_tiny_model
from objectives import needs_reference

REPO = Path(__file__).resolve().parents[1]
TRAIN_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "grad_norm", "learning_rate", "step", "epoch", "split", "tokens", "tokens_per_s",
              "elapsed_s"}
EVAL_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "perplexity", "kl", "step", "split"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    return save_tiny_model("llama", tmp_path_factory.mktemp("models") / "tiny-llama", str(default_model_dir))


def config(tmp_path, tiny_dir, *overrides):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"model.path={tiny_dir}", f"output_dir={tmp_path / 'run'}", f"loss.ref_cache_dir={tmp_path / 'ref_cache'}",
        *overrides])


def reset_accelerate_state():
    """accelerate keeps its state in singletons: each in-process run starts from none."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_in_process(cfg):
    reset_accelerate_state()
    return train_dpo.train(cfg, log=lambda *_: None)


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_sft_then_dpo_from_the_sft_model(tmp_path, tiny_dir):
    sft = config(tmp_path, tiny_dir, "loss.name=sft", "train.max_steps=3", f"output_dir={tmp_path / 'sft'}")
    info = run_in_process(sft)
    assert info["status"] == "completed" and info["steps"] == 3
    rows = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert rows[-1]["split"] == "eval" and rows[-1]["perplexity"] > 1
    before, after = weights(tiny_dir), weights(tmp_path / "sft" / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    dpo = config(tmp_path, tmp_path / "sft" / "final", "train.max_steps=3", "train.eval_every=2")
    info = run_in_process(dpo)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert TRAIN_KEYS <= set(train_rows[0]) and EVAL_KEYS <= set(eval_rows[0])
    assert [r["step"] for r in eval_rows] == [2, 3]
    assert train_rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference at step 1: loss log 2
    assert train_rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "completed" and run["config_hash"] and run["versions"]["torch"]
    assert (tmp_path / "run" / "config.yaml").read_text() == train_dpo.to_yaml(dpo)
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert not (tmp_path / "run" / "checkpoints").exists()  # no optimizer state at the end unless asked
    pairs = read_jsonl(tmp_path / "run" / "eval_pairs.jsonl")  # every eval's per-pair values
    assert sorted({r["step"] for r in pairs}) == [2, 3] and len(pairs) == 2 * run["eval_pairs"]
    for ev in eval_rows:
        mine = [r for r in pairs if r["step"] == ev["step"]]
        assert len({r["pair_id"] for r in mine}) == run["eval_pairs"]
        assert sum(r["margin"] for r in mine) / len(mine) == pytest.approx(ev["rewards/margins"], abs=1e-5)
        assert sum(r["correct"] for r in mine) / len(mine) == pytest.approx(ev["rewards/accuracies"], abs=1e-6)
        r = mine[0]
        assert r["reward_chosen"] == pytest.approx(0.1 * (r["policy_chosen"] - r["ref_chosen"]), abs=1e-4)


EXTRA = {"exo_pair": ["loss.label_smoothing=0.01"], "robust": ["loss.label_smoothing=0.1"],
         "simpo": ["loss.simpo_gamma=0.5", "loss.beta=2.0"]}
VARIANTS = [("sigmoid", ["loss.label_smoothing=0.1"]), ("sigmoid", ["loss.rpo_alpha=0.5"]),
            ("[sigmoid,bco_pair,sft]", ["loss.weights=[0.8,0.2,1.0]"]),
            ("ipo", ["loss.f_divergence=js_divergence", "loss.wpo=true", "loss.ld_alpha=0.5"]),
            ("hinge", ["loss.f_divergence=alpha_divergence", "loss.f_alpha=0.3"]),
            ("[orpo,sft]", ["loss.wpo=true", "loss.ld_alpha=0.0"])]


@pytest.mark.parametrize("loss_type, extra", [(t, EXTRA.get(t, [])) for t in LOSSES] + VARIANTS,
                         ids=list(LOSSES) + [" ".join([t, *e]) for t, e in VARIANTS])
def test_every_loss_type_trains(tmp_path, tiny_dir, loss_type, extra):
    """Every objective (and the options on top) trains two steps: finite losses, each term logged as loss/<type>,
    a reference pass exactly when an objective needs one, and parameters that moved."""
    cfg = config(tmp_path, tiny_dir, f"loss.type={loss_type}", "train.max_steps=2", *extra)
    info = run_in_process(cfg)
    assert info["status"] == "completed"
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    for row in rows:
        terms = sum(w * row[f"loss/{t}"] for t, w in zip(cfg.loss.types, cfg.loss.term_weights))
        assert row["loss"] == pytest.approx(terms, rel=1e-5, abs=1e-6)
    assert ("reference" in info) == needs_reference(cfg.loss.types)
    before, after = weights(tiny_dir), weights(tmp_path / "run" / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def trdpo(tmp_path, tiny_dir, name, *overrides):
    return config(tmp_path, tiny_dir, "train.max_steps=4", "train.lr=1e-2", f"output_dir={tmp_path / name}",
                  *overrides)


def test_trdpo_hard_sync_resets_the_margin_and_the_cache_serves_until_then(tmp_path, tiny_dir):
    """sync_ref_every=2, α = 1: steps 1–2 use the cached reference (the same rows as a frozen-reference run), the
    sync after step 2 copies the policy into the reference, so step 3's rewards (computed before its update) and the
    final eval's (after the step-4 sync) are 0: the reference really moved, no stale cache was read."""
    frozen = run_in_process(trdpo(tmp_path, tiny_dir, "frozen"))
    info = run_in_process(trdpo(tmp_path, tiny_dir, "moving", "loss.sync_ref_every=2", "loss.sync_ref_alpha=1.0"))
    assert info["reference"]["syncs"] == 2 and info["reference"]["first_sync_step"] == 2
    assert frozen["reference"]["cache"] == "miss" and info["reference"]["cache"] == "hit"  # one cache, both runs
    moving = read_jsonl(tmp_path / "moving" / "metrics.jsonl")
    plain = read_jsonl(tmp_path / "frozen" / "metrics.jsonl")
    for step in (1, 2):
        a, b = (next(r for r in rows if r["step"] == step and r["split"] == "train") for rows in (moving, plain))
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["rewards/margins"] == pytest.approx(
            b["rewards/margins"], rel=1e-6, abs=1e-7)
    step3 = next(r for r in moving if r["step"] == 3 and r["split"] == "train")
    final = next(r for r in moving if r["split"] == "eval")
    assert abs(step3["rewards/chosen"]) < 1e-5 and abs(step3["rewards/margins"]) < 1e-5
    assert abs(final["rewards/margins"]) < 1e-5 and abs(final["kl"]) < 1e-6
    assert abs(next(r for r in plain if r["split"] == "eval")["rewards/margins"]) > 1e-3  # the frozen one moved


@pytest.mark.slow
def test_trdpo_soft_sync_resumes_with_the_moved_reference(tmp_path, tiny_dir, monkeypatch):
    """α = 0.5, sync every 2 steps, killed after step 3 (past the step-2 checkpoint, after the first sync): the
    re-run restores the moved reference from the checkpoint and logs the uninterrupted run's losses."""
    overrides = ("loss.sync_ref_every=2", "loss.sync_ref_alpha=0.5", "train.save_every=2")
    run_in_process(trdpo(tmp_path, tiny_dir, "a", *overrides))
    expected = [(r["step"], r["split"], r["loss"]) for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")]
    real_append = train_dpo.append_jsonl

    def append_then_die(path, row):
        real_append(path, row)
        if row["step"] == 3:
            raise Killed()
    monkeypatch.setattr(train_dpo, "append_jsonl", append_then_die)
    with pytest.raises(Killed):
        run_in_process(trdpo(tmp_path, tiny_dir, "b", *overrides))
    monkeypatch.setattr(train_dpo, "append_jsonl", real_append)
    info = run_in_process(trdpo(tmp_path, tiny_dir, "b", *overrides))
    assert info["resumed_from"].endswith("step-000002") and info["reference"]["syncs"] >= 1
    resumed = [(r["step"], r["split"], r["loss"]) for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    assert [g[:2] for g in resumed] == [w[:2] for w in expected]
    for got, want in zip(resumed, expected):
        assert got[2] == pytest.approx(want[2], rel=1e-5, abs=1e-7)


def test_only_trainable_parameters_change_freeze(tmp_path, tiny_dir):
    run_in_process(config(tmp_path, tiny_dir, "train.freeze_layers=1", "train.max_steps=3"))
    before, after = weights(tiny_dir), weights(tmp_path / "run" / "final")
    frozen = [k for k in before if k.startswith(("model.embed_tokens", "model.layers.0."))]
    trained = [k for k in before if k.startswith("model.layers.1.")]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)


def test_lora_trains_adapters_only_and_writes_adapter_and_merged(tmp_path, tiny_dir):
    run_in_process(config(tmp_path, tiny_dir, "lora.r=4", "lora.alpha=8", "train.max_steps=3",
                          "train.save_final_state=true"))  # the last checkpoint holds the adapter's own weights
    final = tmp_path / "run" / "final"
    assert (final / "adapter" / "adapter_config.json").is_file() and (final / "config.json").is_file()
    ckpt = weights(bookkeeping.find_checkpoint(tmp_path / "run"))
    before = weights(tiny_dir)
    lora_b = [k for k in ckpt if "lora_B" in k]
    assert lora_b and any(ckpt[k].abs().sum() > 0 for k in lora_b)  # B starts at zero: it moved
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in ckpt.items() if "lora_" not in k}
    assert all(torch.equal(before[k], base[k]) for k in before if k in base) and len(base) >= len(before) - 1
    merged = weights(final)
    assert any(not torch.equal(before[k], merged[k]) for k in before if k in merged)


class Killed(BaseException):
    pass


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, tiny_dir, monkeypatch):
    straight = config(tmp_path, tiny_dir, "train.max_steps=4", "train.save_every=2", f"output_dir={tmp_path / 'a'}")
    run_in_process(straight)
    expected = [(r["step"], r["split"], r["loss"]) for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")]

    interrupted = config(tmp_path, tiny_dir, "train.max_steps=4", "train.save_every=2", f"output_dir={tmp_path / 'b'}")
    real_append = train_dpo.append_jsonl

    def append_then_die(path, row):  # the process dies after logging step 3, past the step-2 checkpoint
        real_append(path, row)
        if row["step"] == 3:
            raise Killed()
    monkeypatch.setattr(train_dpo, "append_jsonl", append_then_die)
    with pytest.raises(Killed):
        run_in_process(interrupted)
    monkeypatch.setattr(train_dpo, "append_jsonl", real_append)
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3]
    info = run_in_process(interrupted)
    assert info["resumed_from"].endswith("step-000002")
    resumed = [(r["step"], r["split"], r["loss"]) for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    assert [s for s, _, _ in resumed] == [s for s, _, _ in expected]  # no duplicated steps
    for got, want in zip(resumed, expected):
        assert got[:2] == want[:2] and got[2] == pytest.approx(want[2], rel=1e-6, abs=1e-7)
    assert run_in_process(interrupted)["status"] == "completed"  # a third call finds it finished


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dir, monkeypatch):
    real_loss, calls = train_dpo.objective_terms, []

    def inf_on_third_call(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.losses = out.losses + float("inf")
        return out
    monkeypatch.setattr(train_dpo, "objective_terms", inf_on_third_call)
    cfg = config(tmp_path, tiny_dir, "train.max_steps=4", "train.save_every=1")
    with pytest.raises(train_dpo.NonFiniteError, match=r"step 3: the loss is inf"):
        run_in_process(cfg)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "failed" and "step 3" in run["error"] and run["last_checkpoint"].endswith("step-000002")
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def rows(margins=(), chosen=(), evals=()):
    """metrics.jsonl rows: train rows with these margins and chosen log-probs (steps 1, 2, ...), eval losses."""
    train = [{"step": i + 1, "split": "train", "rewards/margins": m, "logps/chosen": c}
             for i, (m, c) in enumerate(itertools.zip_longest(margins, chosen, fillvalue=0.0))]
    return train + [{"step": 2 * (i + 1), "split": "eval", "loss": x} for i, x in enumerate(evals)]


@pytest.mark.parametrize("rules, history, reason", [
    (["prune.margin_below=-1", "prune.patience=3"], rows(margins=[0.1, -2, -3, -4]), "margin collapse: rewards/margins "
     "below -1 for 3 train logs in a row (-2.000, -3.000, -4.000 at steps 2-4)"),
    (["prune.margin_below=-1", "prune.patience=3"], rows(margins=[-2, -3, 0.5, -4]), None),  # not in a row
    (["prune.margin_below=-1", "prune.patience=3", "prune.min_steps=5"], rows(margins=[-2, -3, -4, -5]), None),
    # chosen log-probs -10, -12, -15, -18 at steps 1-4: least-squares slope (-1.5·-4 + -.5·-2 + .5·1 + 1.5·4) / 5
    # = (6 + 1 + 0.5 + 6) / 5 -> -2.7 nats/step
    (["prune.chosen_logps_slope=2", "prune.patience=3"], rows(chosen=[-10, -12, -15, -18]),
     "chosen log-probs falling 2.700 nats/step over steps 1-4 (more than 2)"),
    (["prune.chosen_logps_slope=3", "prune.patience=3"], rows(chosen=[-10, -12, -15, -18]), None),
    (["prune.eval_loss_rising=2"], rows(evals=[0.69, 0.68, 0.70, 0.72]),
     "eval loss rising at 2 evals in a row (0.6800 -> 0.7000 -> 0.7200)"),
    (["prune.eval_loss_rising=2"], rows(evals=[0.69, 0.70, 0.69, 0.72]), None),
    ([], rows(margins=[-100] * 5), None),  # no rule set
])
def test_prune_rules_by_hand(tmp_path, tiny_dir, rules, history, reason):
    cfg = config(tmp_path, tiny_dir, *rules)
    assert train_dpo.prune_reason(cfg, history, history[-1]["step"]) == reason
    sft = config(tmp_path, tiny_dir, "loss.name=sft", *rules)
    assert train_dpo.prune_reason(sft, history, history[-1]["step"]) is None, "SFT is never pruned"


def test_a_collapsing_run_is_pruned_checkpointed_and_resumes_when_retried(tmp_path, tiny_dir):
    """High lr and β drive the tiny model's margins far below zero: the rule stops it at a step boundary with a
    checkpoint, run.json says pruned (reason, step); the same config again resumes from that checkpoint (a sweep does
    so only with --retry-pruned) and, with the rule loosened, trains to the end."""
    collapse = ["train.max_steps=12", "train.lr=0.05", "loss.beta=5", "prune.margin_below=-10", "prune.patience=2"]
    info = run_in_process(config(tmp_path, tiny_dir, *collapse))
    assert info["status"] == "pruned" and info["pruned"]["step"] < 12, info.get("pruned")
    assert info["pruned"]["reason"].startswith("margin collapse: rewards/margins below -10 for 2 train logs in a row")
    step = info["pruned"]["step"]
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["status"] == "pruned" and saved["last_checkpoint"].endswith(f"step-{step:06d}")
    assert not (tmp_path / "run" / "final").exists(), "a pruned run writes no final model"
    margins = [r["rewards/margins"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")][-2:]
    assert all(m < -10 for m in margins)
    loosened = [*collapse[:-2], "prune.margin_below=-1.0e9", "prune.patience=2"]  # prune: may change on resume
    again = run_in_process(config(tmp_path, tiny_dir, *loosened))
    assert again["status"] == "completed" and again["resumed_from"].endswith(f"step-{step:06d}")
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"] == \
        list(range(1, 13)), "resumed after the pruned step, nothing logged twice"


def test_a_non_finite_loss_prunes_instead_of_failing_when_asked(tmp_path, tiny_dir, monkeypatch):
    real_loss = train_dpo.objective_terms

    def nan_loss(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        out.losses = out.losses + float("nan")
        return out
    monkeypatch.setattr(train_dpo, "objective_terms", nan_loss)
    info = run_in_process(config(tmp_path, tiny_dir, "train.max_steps=3", "prune.non_finite=true"))
    assert info["status"] == "pruned" and info["pruned"]["reason"].startswith("non-finite values: step 1: the loss is nan")


def test_reference_cache_is_shared_across_betas(tmp_path, tiny_dir):
    first = run_in_process(config(tmp_path, tiny_dir, "train.max_steps=1", "loss.beta=0.1", f"output_dir={tmp_path / 'b1'}"))
    second = run_in_process(config(tmp_path, tiny_dir, "train.max_steps=1", "loss.beta=0.5", f"output_dir={tmp_path / 'b5'}"))
    assert first["reference"]["cache"] == "miss" and first["reference"]["forward_passes"] > 0
    assert second["reference"] == {**first["reference"], "cache": "hit", "forward_passes": 0}
    other_data = run_in_process(config(tmp_path, tiny_dir, "train.max_steps=1", "tokenize.max_length=100",
                                       f"output_dir={tmp_path / 'len'}"))
    assert other_data["reference"]["cache"] == "miss" and other_data["reference"]["key"] != first["reference"]["key"]


def test_bf16_autocast_and_gradient_checkpointing_run(tmp_path, tiny_dir):
    info = run_in_process(config(tmp_path, tiny_dir, "train.mixed_precision=bf16", "train.gradient_checkpointing=true",
                                 "train.max_steps=2", "train.grad_accum=2"))
    assert info["status"] == "completed"
    train_rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert len(train_rows) == 2 and all(r["grad_norm"] > 0 for r in train_rows)


def test_config_change_in_a_used_output_dir_is_refused(tmp_path, tiny_dir):
    run_in_process(config(tmp_path, tiny_dir, "train.max_steps=1"))
    with pytest.raises(train_dpo.UserInputError, match=r"differs from this run's config \(loss.beta: 0.1 -> 0.3\)"):
        run_in_process(config(tmp_path, tiny_dir, "train.max_steps=1", "loss.beta=0.3"))


def test_a_run_folder_from_before_a_new_config_key_still_resumes(tmp_path, tiny_dir):
    """config.yaml written before a key existed (here: the whole prune section and loss.wpo, removed from the file)
    is the same config while the new keys keep their defaults; a changed prune rule is not a changed run."""
    cfg = config(tmp_path, tiny_dir, "train.max_steps=2", "train.save_every=1")
    run_in_process(cfg)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del saved["prune"], saved["loss"]["wpo"]
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    (tmp_path / "run" / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    again = run_in_process(config(tmp_path, tiny_dir, "train.max_steps=2", "train.save_every=1",
                                  "prune.eval_loss_rising=3"))
    assert again["status"] == "completed"
    with pytest.raises(train_dpo.UserInputError, match=r"loss.wpo: False -> True"):  # written whole on resume
        run_in_process(config(tmp_path, tiny_dir, "train.max_steps=2", "train.save_every=1", "loss.wpo=true"))


def launch(tmp_path, tiny_dir, launcher_args, env_extra, out):
    env = {**os.environ, **env_extra}
    cmd = [str(REPO / ".venv" / "bin" / "accelerate"), "launch", *launcher_args, "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", "train_dpo.py",
           "--config", "configs/tiny.yaml", f"model.path={tiny_dir}", f"output_dir={out}",
           f"loss.ref_cache_dir={tmp_path / 'ref_cache'}", "train.max_steps=3", "train.save_every=1"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = bookkeeping.find_checkpoint(out)  # every rank's RNG state landed inside the renamed folder
    assert checkpoint.name == "step-000003" and {"random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in checkpoint.iterdir()}
    return json.loads((out / "run.json").read_text())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical(tmp_path, tiny_dir):
    info = launch(tmp_path, tiny_dir, ["--multi_gpu"], {"ACCELERATE_USE_CPU": "1"}, tmp_path / "ddp")
    assert info["status"] == "completed" and info["world_size"] == 2
    a, b = info["parameter_checksums"]
    assert a == b


@pytest.mark.multiprocess
@pytest.mark.slow
def test_deepspeed_zero2_on_cpu_completes(tmp_path, tiny_dir):
    info = launch(tmp_path, tiny_dir, ["--use_deepspeed", "--deepspeed_config_file", "configs/accelerate/zero2_cpu.json"],
                  {"DS_ACCELERATOR": "cpu"}, tmp_path / "z2")
    assert info["status"] == "completed" and info["world_size"] == 2
    rows = read_jsonl(tmp_path / "z2" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]


def test_precompute_ref_fills_the_cache_a_run_then_hits(tmp_path, tiny_dir):
    reset_accelerate_state()
    result = run_main(train_dpo.main, "--config", "configs/tiny.yaml", "--precompute-ref", f"model.path={tiny_dir}",
                      f"loss.ref_cache_dir={tmp_path / 'ref_cache'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "ref_cache").glob("*.pt"))) == 1
    info = run_in_process(config(tmp_path, tiny_dir, "train.max_steps=1"))
    assert info["reference"]["cache"] == "hit" and info["reference"]["forward_passes"] == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
def test_fused_logps_head_equals_sequence_logps_and_its_gradients(tokenizer, arch):
    from chat_format import tokenize_pair
    from dpo_loss import sequence_logps
    from models import build_tiny_model
    from preference_data import PreferencePair

    def pair(i, n):
        return PreferencePair(id=f"p{i}", prompt=({"role": "user", "content": "word " * n},), chosen="yes " * (n + 2),
                              rejected="no")
    batch = train_dpo.collate([tokenize_pair(tokenizer, pair(i, n), 128, 64) for i, n in enumerate([3, 20, 9])],
                              tokenizer.pad_token_id)
    plain = build_tiny_model(arch, tokenizer)
    train_dpo.disable_dropout(plain)
    fused = train_dpo.add_logps_head(build_tiny_model(arch, tokenizer), chunk_tokens=7)
    train_dpo.disable_dropout(fused)
    expected = sequence_logps(plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"])
    got = train_dpo.forward_logps(fused, batch)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5)
    expected.sum().backward()
    got.sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-3 * a.grad.abs().max(), name


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_a_rerun_resumes(tmp_path, tiny_dir):
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "train_dpo.py", "--config", "configs/tiny.yaml", f"model.path={tiny_dir}",
           f"output_dir={out}", f"loss.ref_cache_dir={tmp_path / 'ref_cache'}", "train.max_steps=40"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(read_jsonl(out / "metrics.jsonl")) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 143, stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert run["status"] == "interrupted" and 3 <= steps[-1] < 40
    assert run["last_checkpoint"].endswith(f"step-{steps[-1]:06d}")
    reset_accelerate_state()
    resumed = run_main(train_dpo.main, *cmd[2:])  # the re-run needs no process of its own
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 41))


def run_ranks(args: list, processes: int, env: dict, logs: Path) -> list[subprocess.CompletedProcess]:
    """train_dpo.py as `processes` ranks of one gloo group, started the way torchrun starts them (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT) but without its agent, which kills the other ranks as soon as one exits: each rank's own exit
    code is seen. Output goes to files under logs (a full pipe would stall one rank and, at a collective, all)."""
    logs.mkdir(parents=True, exist_ok=True)
    rendezvous = {"WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"} if processes > 1 else {}
    ranks = []
    try:
        for r in range(processes):
            with open(logs / f"rank{r}.out", "w") as stdout, open(logs / f"rank{r}.err", "w") as stderr:
                ranks.append(subprocess.Popen(
                    [sys.executable, "train_dpo.py", *args], cwd=REPO, stdout=stdout, stderr=stderr,
                    env={**env, **rendezvous, **({"RANK": str(r), "LOCAL_RANK": str(r)} if rendezvous else {})}))
        codes = [p.wait(timeout=600) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    return [subprocess.CompletedProcess(p.args, code, (logs / f"rank{r}.out").read_text(),
                                        (logs / f"rank{r}.err").read_text())
            for r, (p, code) in enumerate(zip(ranks, codes))]


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_full_disk_stops_with_a_clear_error_and_a_rerun_resumes(tmp_path, tiny_dir, processes):
    """A real full filesystem: output_dir on a 60 MB tmpfs holds the step-2 checkpoint (~40 MB) but not step 4's. With
    two DDP processes both stop with exit code 4 (neither waits at a barrier the other left), rank 0 alone says why,
    and the re-run resumes on both."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        out = disk / "run"
        args = ["--config", "configs/tiny.yaml", f"model.path={tiny_dir}", f"output_dir={out}",
                f"loss.ref_cache_dir={tmp_path / 'ref_cache'}", "train.max_steps=6", "train.save_every=2"]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
        full = run_ranks(args, processes, env, tmp_path / "full")
        stderr = "".join(r.stderr for r in full)
        assert [r.returncode for r in full] == [4] * processes, stderr[-3000:]  # every rank stopped on its own
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors == [line for line in full[0].stderr.splitlines()
                                               if line.startswith("error: ")], stderr[-3000:]  # rank 0 says it once
        assert errors[0].startswith(f"error: no space left on the device holding {out} while writing the step-4 ")
        assert "step-000002, is kept" in errors[0]
        assert "Traceback" not in stderr
        assert "warning: this run's files need about" in full[0].stdout
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # the partial one is gone
        run = json.loads((out / "run.json").read_text())
        assert run["status"] == "failed" and run["last_checkpoint"].endswith("step-000002")

        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)  # space freed: files stay
        resumed = run_ranks(args, processes, env, tmp_path / "resumed")
        assert [r.returncode for r in resumed] == [0] * processes, "".join(r.stderr for r in resumed)[-3000:]
        run = json.loads((out / "run.json").read_text())
        assert run["status"] == "completed" and run["resumed_from"].endswith("step-000002")
        assert run["world_size"] == processes
        assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("error, reason", [
    (OSError(28, "No space left on device", "x"), "no space left"),
    (OSError(122, "Disk quota exceeded", "x"), "disk quota exceeded"),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "no space left"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
     "a write failed (full disk or quota?)"),
    (OSError(13, "Permission denied", "x"), None),
    (MemoryError(), None),
])
def test_disk_full_reason_reads_each_writers_way_of_saying_it(tmp_path, error, reason):
    assert bookkeeping.disk_full_reason(error, tmp_path) == reason


def test_write_agreed_removes_the_partial_folder_and_names_the_kept_checkpoint(tmp_path):
    from accelerate import Accelerator

    reset_accelerate_state()
    accelerator = Accelerator(cpu=True)
    out = tmp_path / "run"
    kept = out / "checkpoints" / "step-000002"
    kept.mkdir(parents=True)
    (kept / "trainer_state.json").write_text("{}")
    partial = out / "checkpoints" / ".tmp-step-000004"
    partial.mkdir()

    def write():
        (partial / "model.safetensors").write_bytes(b"\0" * 3 * 2**20)
        raise OSError(28, "No space left on device", str(partial / "optimizer.bin"))
    with pytest.raises(bookkeeping.DiskFullError) as caught:
        bookkeeping.write_agreed(accelerator, partial, "the step-4 checkpoint", out, write)
    message = str(caught.value)
    assert message.startswith(f"no space left on the device holding {out} while writing the step-4 checkpoint")
    assert "3 MiB had been written" in message and f"{kept}, is kept" in message
    assert not partial.exists() and kept.is_dir()

    def broken():
        raise ValueError("not a disk error")
    with pytest.raises(ValueError, match="not a disk error"):  # anything else passes through untouched
        bookkeeping.write_agreed(accelerator, partial, "the final model", out, broken)
