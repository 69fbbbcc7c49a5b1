"""analyze_sweep.py on sweep folders written here with known values, and its statistics on simulated data.
(The real tiny sweep's output is analysed in test_sweep.py, after the sweep ran on the local Slurm cluster.)"""
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import analyze_sweep
import stats
from conftest import analyse_without_torch

FIGURES = ["curves_train", "curves_eval", "final_vs_beta", "win_rate_vs_beta", "kl_win_rate_frontier",
           "judge_diagnostics"]


def config(name, beta=0.1, seed=0, loss="dpo", steps=8):
    return {"model": {"path": "models/base" if loss == "sft" else "logs/s/sft/final", "dtype": "float32"},
            "data": {"path": "data/hh.jsonl", "format": "hh", "max_pairs": 64, "eval_fraction": 0.25, "split_seed": 0},
            "tokenize": {"max_length": 256, "max_prompt_length": 192},
            "loss": {"name": loss, "type": "sigmoid", "beta": beta},
            "train": {"max_steps": steps, "batch_size": 4, "grad_accum": 1, "lr": 1e-6, "seed": seed,
                      "scheduler": "linear", "warmup_steps": 1, "mixed_precision": "no", "max_eval_pairs": 0},
            "lora": {"r": 0}, "output_dir": f"logs/s/{name}"}


def dpo_rows(steps=8, eval_at=(4, 8), margin=lambda s: 0.05 * s, eval_loss=lambda s: 0.69 - 0.01 * s,
             accuracy=lambda s: 0.75, kl=lambda s: 0.001 * s):
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "epoch": s / steps, "split": "train", "loss": 0.69 - 0.01 * s,
                     "rewards/chosen": margin(s) / 2, "rewards/rejected": -margin(s) / 2, "rewards/margins": margin(s),
                     "rewards/accuracies": 0.5 + 0.03 * s, "kl": kl(s), "grad_norm": 1.0, "learning_rate": 1e-6})
        if s in eval_at:
            rows.append({"step": s, "epoch": s / steps, "split": "eval", "loss": eval_loss(s),
                         "rewards/chosen": margin(s) / 2, "rewards/rejected": -margin(s) / 2,
                         "rewards/margins": margin(s), "rewards/accuracies": accuracy(s), "kl": kl(s)})
    return rows


def write_run(sweep, name, cfg, rows, status="completed", **info):
    folder = sweep / name
    folder.mkdir(parents=True)
    (sweep / "configs").mkdir(exist_ok=True)
    (sweep / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "run.json").write_text(json.dumps({"status": status, "eval_pairs": 48, "train_pairs": 144,
                                                 "max_steps": cfg["train"]["max_steps"], "host": "test",
                                                 "world_size": 1, "git_commit": "abc", **info}))
    with open(folder / "metrics.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def write_judgments(sweep, run, outcomes, lengths=None, summary=True):
    """outcomes: list of 'candidate'/'baseline'/'tie'/'error', one per pair, judged in one (alternating) order.
    The file also holds what a real verdict file accumulates and the summary does not count: a first attempt at
    pair 0 that failed (same key, older row), and a later run of another template with the opposite verdicts."""
    folder = sweep / "judgments"
    folder.mkdir(exist_ok=True)
    judged, rows = {}, []
    flip = {"A": "B", "B": "A", "tie": "tie", "error": "A"}
    for i, winner in enumerate(outcomes):
        position = "A" if i % 2 == 0 else "B"
        verdict = {"candidate": position, "baseline": "B" if position == "A" else "A"}.get(winner, winner)
        pid = f"{'heldout' if i % 3 else 'mt_bench'}/p{i}#0"
        cand, base = lengths[i] if lengths else (100, 100)
        key = f"{run}-{i}"
        judged[pid] = [[position, key]]
        row = {"key": key, "task": "compare", "pair_id": pid, "candidate_position": position, "verdict": verdict,
               "winner": winner, "identical_answers": False, "candidate_chars": cand, "baseline_chars": base,
               "candidate_model": run, "baseline_model": "sft", "judge_fingerprint": "j", "template_version": "t@1",
               "mode": "choice", "candidate_sampling_hash": "c", "baseline_sampling_hash": "b",
               "timestamp": f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}"}
        if i == 0:
            rows.append({**row, "verdict": "error", "winner": "error", "timestamp": "2025-12-31T00:00:00"})
        rows.append(row)
        rows.append({**row, "key": f"{run}-other-{i}", "template_version": "t@2", "verdict": flip[verdict],
                     "timestamp": f"2026-02-01T00:{i // 60:02d}:{i % 60:02d}"})
    with open(folder / f"{run}.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    if summary:
        (folder / f"{run}.summary.json").write_text(json.dumps({
            "judge_model": "judge/J", "template_version": "t@1", "mode": "choice", "order": "random", "seed": 0,
            "candidate": {"model_name": run, "sampling": {"temperature": 0.0, "max_new_tokens": 64}},
            "baseline": {"model_name": "sft"}, "n": len(outcomes), "judged_pairs": judged}))


def write_calibration(sweep, agreement=0.8, ci=(0.7, 0.9)):
    (sweep / "judgments").mkdir(exist_ok=True)
    sets = {"llmbar:Natural": {"pairs": 20, "agreement": agreement, "agreement_ci": list(ci)},
            "heldout:/x/heldout.yaml": {"pairs": 10, "agreement": agreement, "agreement_ci": list(ci)}}
    (sweep / "judgments" / "calibration.summary.json").write_text(json.dumps({"calibration": {
        "pairs": 30, "agreement": agreement, "agreement_ci": list(ci), "first_position_rate": 0.55, "sets": sets}}))


@pytest.fixture
def sweep(tmp_path):
    """SFT, beta 0.1 x seeds 0/1 and beta 0.5 x seed 0 (healthy, judged); beta 1.0 planned but never started;
    beta 2.0 stopped on a NaN loss."""
    s = tmp_path / "logs" / "synthetic"
    write_run(s, "sft", config("sft", loss="sft"), [{"step": k, "split": "train", "loss": 2.0 - 0.1 * k} for k in (1, 2)]
              + [{"step": 2, "split": "eval", "loss": 1.5}])
    write_run(s, "beta0.1_seed0", config("beta0.1_seed0", 0.1, 0), dpo_rows(eval_loss=lambda k: 0.69 - 0.01 * k))
    write_run(s, "beta0.1_seed1", config("beta0.1_seed1", 0.1, 1), dpo_rows(eval_loss=lambda k: 0.68 - 0.01 * k))
    write_run(s, "beta0.5_seed0", config("beta0.5_seed0", 0.5, 0), dpo_rows(margin=lambda k: 0.2 * k))
    (s / "configs" / "beta1_seed0.yaml").write_text(yaml.safe_dump(config("beta1_seed0", 1.0)))
    nan_rows = dpo_rows(steps=3, eval_at=())
    nan_rows.append({"step": 4, "split": "train", "loss": None, "rewards/margins": None})
    write_run(s, "beta2_seed0", config("beta2_seed0", 2.0), nan_rows, status="failed",
              error="step 4: the loss is nan (micro-batch 0, pairs [...])")
    write_judgments(s, "beta0.1_seed0", ["candidate"] * 30 + ["baseline"] * 10 + ["tie"] * 8 + ["error"] * 2)
    write_judgments(s, "beta0.1_seed1", ["candidate"] * 20 + ["baseline"] * 20 + ["tie"] * 10)
    write_judgments(s, "beta0.5_seed0", ["candidate"] * 10 + ["baseline"] * 40)
    write_calibration(s)
    (s / "generations").mkdir()
    for model, tokens in (("sft", [10, 20, 30]), ("beta0.1_seed0", [40, 64, 64])):
        with open(s / "generations" / f"{model}.jsonl", "w") as fh:
            for i, n in enumerate(tokens):
                fh.write(json.dumps({"key": f"{model}|p{i}", "sampling_hash": "c", "new_tokens": n, "timestamp": "t",
                                     "finish_reason": "length" if n == 64 else "stop"}) + "\n")
    (s / "sweep.json").write_text(json.dumps({"jobs": {}, "submissions": [{"config": "configs/sweep_x.yaml"}]}))
    return s


def analyse(sweep, out, *extra):
    code = analyze_sweep.main(["--sweep", str(sweep), "--out", str(out), "--bootstrap", "200", *extra])
    assert code == 0
    return pd.read_csv(out / "summary.csv").set_index("run")


def test_tables_equal_the_inputs(sweep, tmp_path, capsys):
    table = analyse(sweep, tmp_path / "report")
    r = table.loc["beta0.1_seed0"]
    assert (r["beta"], r["seed"], r["loss"], r["status"], r["steps"], r["eval_step"]) == (0.1, 0, "sigmoid", "completed", 8, 8)
    assert r["eval_loss"] == pytest.approx(0.69 - 0.08) and r["eval_margin"] == pytest.approx(0.4)
    assert r["eval_accuracy"] == 0.75 and r["eval_kl"] == pytest.approx(0.008)
    assert table.loc["beta0.1_seed1", "eval_loss"] == pytest.approx(0.60)
    # 30 wins, 10 losses, 8 ties of 48 valid pairs (2 errors counted, not scored): (30 + 4) / 48
    assert r["win_rate"] == pytest.approx(34 / 48) and r["judged"] == 50 and r["judge_errors"] == 2
    assert r["win_rate_ci_low"] < 34 / 48 < r["win_rate_ci_high"]
    assert table.loc["beta0.1_seed1", "win_rate"] == 0.5 and table.loc["beta0.5_seed0", "win_rate"] == 0.2
    # equal lengths everywhere: nothing to control for, LC is the raw rate
    assert r["lc_win_rate"] == pytest.approx(34 / 48)
    # a star of comparisons against SFT: the BT score is the win rate's log-odds on the Elo scale
    assert table.loc["sft", "bt_score"] == 1000
    assert table.loc["beta0.5_seed0", "bt_score"] == pytest.approx(1000 + 400 * math.log10(0.2 / 0.8), abs=0.5)
    assert table.loc["beta0.1_seed0", "bt_score"] > table.loc["beta0.1_seed1", "bt_score"] > table.loc["beta0.5_seed0", "bt_score"]
    assert (table.loc["sft", "answers"], table.loc["sft", "mean_new_tokens"], table.loc["sft", "hit_max_tokens"]) == (3, 20, 0)
    assert table.loc["beta0.1_seed0", "mean_new_tokens"] == 56 and table.loc["beta0.1_seed0", "hit_max_tokens"] == 2 / 3
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "70.8 [" in md and "| beta0.5_seed0 | sigmoid | 0.500 | 0 | completed |" in md
    best = md.split("Best run per criterion")[1]
    assert "| highest win rate vs SFT | beta0.1_seed0 |" in best and "| largest eval reward margin | beta0.5_seed0 |" in best
    report = (tmp_path / "report" / "README.md").read_text()
    assert "β ∈ {0.1, 0.5, 1, 2}" in report and "`judge/J`" in report and "144 train / 48 held-out" in report
    for name in FIGURES:
        assert f"](figures/{name}.png)" in report


def test_every_figure_is_a_valid_png_and_pdf(sweep, tmp_path):
    analyse(sweep, tmp_path / "report")
    for name in FIGURES:
        png, pdf = tmp_path / "report" / "figures" / f"{name}.png", tmp_path / "report" / "figures" / f"{name}.pdf"
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] >= 450, (name, image.size)
        data = pdf.read_bytes()
        assert data.startswith(b"%PDF") and b"%%EOF" in data[-1024:], name


def test_missing_and_nan_runs_are_reported_and_flagged(sweep, tmp_path, capsys):
    table = analyse(sweep, tmp_path / "report")
    out = capsys.readouterr().out
    assert table.loc["beta1_seed0", "status"] == "missing"
    assert "beta1_seed0: missing" in out
    assert table.loc["beta2_seed0", "status"] == "failed" and "non-finite" in table.loc["beta2_seed0", "flags"]
    assert "step 4 (train): loss=None" in out
    assert pd.isna(table.loc["beta0.1_seed0", "flags"])  # a healthy run: no flag (an empty CSV cell)
    report = (tmp_path / "report" / "README.md").read_text()
    assert "**beta1_seed0**: missing" in report and "**beta2_seed0**: failed at step 4/8: step 4: the loss is nan" in report
    assert "**beta2_seed0** non-finite" in report
    best = (tmp_path / "report" / "summary.md").read_text().split("Best run per criterion")[1]
    assert "beta2_seed0" not in best  # a run with non-finite metrics is never the best


def flags_of(tmp_path, rows, **kw):
    s = tmp_path / "logs" / "one"
    write_run(s, "r", config("r", 0.1), rows, **kw)
    run = analyze_sweep.load_runs(s)[0]
    return analyze_sweep.stability_flags(run, collapse_margin=1.0)


def test_margin_collapse_is_flagged(tmp_path):
    flags = flags_of(tmp_path, dpo_rows(margin=lambda k: 1.0 - 0.5 * k))
    assert set(flags) == {"margin-collapse"}, flags
    assert "eval margin -3" in flags["margin-collapse"]


def test_accuracy_stuck_at_chance_is_flagged(tmp_path):
    flags = flags_of(tmp_path, dpo_rows(accuracy=lambda k: 0.52))  # 25 of 48: binomial p = 0.89
    assert set(flags) == {"accuracy-0.5"}, flags
    # 36 of 48 at the last eval is far from chance: no flag
    assert not flags_of(tmp_path / "b", dpo_rows(accuracy=lambda k: 0.5 if k < 8 else 0.75))


def test_eval_loss_rising_while_train_falls_is_flagged(tmp_path):
    flags = flags_of(tmp_path, dpo_rows(eval_at=(2, 4, 6, 8), eval_loss=lambda k: 0.60 + 0.01 * abs(k - 4)))
    assert set(flags) == {"eval-loss-rising"}, flags
    assert "since step 4" in flags["eval-loss-rising"]


def test_healthy_run_has_no_flags(tmp_path):
    assert flags_of(tmp_path, dpo_rows()) == {}


def test_resumed_run_keeps_the_later_row_of_a_repeated_step(tmp_path):
    rows = dpo_rows(steps=4, eval_at=())
    rows += [{**rows[2], "loss": 0.123}, {**rows[3], "loss": 0.124}]  # steps 3, 4 re-logged after a resume
    s = tmp_path / "logs" / "one"
    write_run(s, "r", config("r"), rows)
    run = analyze_sweep.load_runs(s)[0]
    assert list(run.rows("train")["step"]) == [1, 2, 3, 4]
    assert list(run.rows("train")["loss"])[2:] == [0.123, 0.124]


def test_win_rate_ci_matches_the_exact_binomial_interval():
    """60 wins of 100: the percentile bootstrap agrees with Clopper-Pearson (0.497, 0.697) to 0.02."""
    from scipy.stats import binomtest

    exact = binomtest(60, 100).proportion_ci(0.95, method="exact")
    low, high = stats.bootstrap_ci([1.0] * 60 + [0.0] * 40, seed=0)
    assert low == pytest.approx(exact.low, abs=0.02) and high == pytest.approx(exact.high, abs=0.02)


def test_length_controlled_win_rate_recovers_simulated_parameters():
    """Verdicts drawn from logit P(win) = theta + phi tanh(delta / sd): the fit gives back theta and phi, and LC
    = sigmoid(theta) while the raw win rate is inflated by the longer answers."""
    rng = np.random.default_rng(1)
    n, theta, phi = 4000, -0.3, 1.5
    baseline = rng.integers(200, 400, n)
    candidate = baseline + rng.normal(150, 200, n).astype(int)  # mostly longer
    delta = candidate - baseline
    p = 1 / (1 + np.exp(-(theta + phi * np.tanh(delta / delta.std(ddof=1)))))
    wins = (rng.random(n) < p).astype(float)
    lc = stats.lc_win_rate(wins, candidate, baseline, seed=0, n_boot=100)
    assert lc["theta"] == pytest.approx(theta, abs=0.12) and lc["phi"] == pytest.approx(phi, abs=0.15)
    assert lc["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-theta)), abs=0.03)
    assert wins.mean() > 0.55 > lc["lc_win_rate"]
    assert lc["lc_ci"][0] < lc["lc_win_rate"] < lc["lc_ci"][1]


def test_bradley_terry_recovers_simulated_scores():
    """Battles among four models with known Elo scores (SFT the anchor at 1000), star and round-robin, ties 1/2."""
    rng = np.random.default_rng(2)
    truth = {"sft": 1000.0, "a": 1100.0, "b": 950.0, "c": 1200.0}
    names = list(truth)
    battles = []
    for _ in range(6000):
        i, j = rng.choice(4, 2, replace=False)
        a, b = names[i], names[j]
        p = 1 / (1 + 10 ** ((truth[b] - truth[a]) / 400))
        u = rng.random()
        battles.append({"model_a": a, "model_b": b, "score": 0.5 if abs(u - p) < 0.05 else float(u < p)})
    ranking = stats.bradley_terry(pd.DataFrame(battles), "sft", seed=0, n_boot=100).set_index("model")
    for model, score in truth.items():
        assert ranking.loc[model, "score"] == pytest.approx(score, abs=25), model
        assert ranking.loc[model, "ci_low"] - 10 <= score <= ranking.loc[model, "ci_high"] + 10, model
    assert list(ranking.index) == ["c", "a", "sft", "b"]


def test_bradley_terry_stays_finite_when_a_run_wins_everything():
    battles = pd.DataFrame({"model_a": ["a"] * 20 + ["b"] * 20, "model_b": ["sft"] * 40,
                            "score": [1.0] * 20 + [0.5] * 20})
    ranking = stats.bradley_terry(battles, "sft", seed=0, n_boot=50).set_index("model")
    assert np.isfinite(ranking["score"]).all() and ranking.loc["a", "score"] > 1300
    assert ranking.loc["b", "score"] == pytest.approx(1000, abs=1)


def test_partial_judging_without_a_summary_is_analysed_and_said(sweep, tmp_path, capsys):
    """No summary yet (its judge job is still running): the newest judge/template's rows are read, here the t@2
    rows whose verdicts are the opposite of t@1's, so beta0.5_seed0's 10 wins of 50 become 40."""
    (sweep / "judgments" / "beta0.5_seed0.summary.json").unlink()
    table = analyse(sweep, tmp_path / "report")
    assert table.loc["beta0.5_seed0", "judging"] == "partial" and table.loc["beta0.5_seed0", "win_rate"] == 0.8
    assert table.loc["beta0.1_seed0", "judging"] == "complete"
    assert "judging of **beta0.5_seed0** is partial" in (tmp_path / "report" / "README.md").read_text()


def write_rows(path, rows):
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps({"task": "compare", "candidate_chars": 10, "baseline_chars": 10, **row}) + "\n")


def test_both_orders_position_rate_and_consistency_by_hand(tmp_path):
    """p0: candidate wins in both orders; p1: the judge says A both times (the orders disagree: a tie); p2: identical
    answers (tied without asking: no evidence of position bias); p3: tie both times.
    Position-A rate over the 6 asked judgments: (1 + 0 + 1 + 1 + 1/2 + 1/2) / 6 = 2/3; consistency 2 of 3 asked pairs;
    win rate (1 + 1/2 + 1/2 + 1/2) / 4 = 0.625."""
    verdicts = {"p0": ("A", "B"), "p1": ("A", "A"), "p2": ("tie", "tie"), "p3": ("tie", "tie")}
    rows, placed = [], {}
    for pid, (when_a, when_b) in verdicts.items():
        placed[pid] = [["A", f"{pid}-A"], ["B", f"{pid}-B"]]
        for position, verdict in (("A", when_a), ("B", when_b)):
            rows.append({"key": f"{pid}-{position}", "pair_id": pid, "candidate_position": position,
                         "verdict": verdict, "identical_answers": pid == "p2"})
    path = tmp_path / "run.jsonl"
    write_rows(path, rows)
    (tmp_path / "run.summary.json").write_text(json.dumps({"judged_pairs": placed, "order": "both"}))
    c = analyze_sweep.load_comparison(path)
    assert c.state == "complete"
    assert dict(zip(c.pairs["pair_id"], c.pairs["winner"])) == {"p0": "candidate", "p1": "tie", "p2": "tie", "p3": "tie"}
    assert c.pairs["score"].mean() == 0.625
    assert analyze_sweep.first_position_rate(c.judgments) == pytest.approx(2 / 3)
    assert analyze_sweep.consistency(c.judgments) == pytest.approx(2 / 3)


def test_a_row_shared_by_two_pairs_is_unswapped_with_each_pairs_position(tmp_path):
    """p5's candidate is p4's baseline and vice versa: with p5 judged in position B its judgment has the same
    answers A and B, so judge.py reuses p4's row (one key). The verdict A is a candidate win for p4 and a baseline
    win for p5; the row's stored winner (p4's view) must not be copied to p5."""
    path = tmp_path / "run.jsonl"
    write_rows(path, [{"key": "K", "pair_id": "p4", "candidate_position": "A", "verdict": "A", "winner": "candidate"}])
    (tmp_path / "run.summary.json").write_text(json.dumps({"judged_pairs": {"p4": [["A", "K"]], "p5": [["B", "K"]]}}))
    c = analyze_sweep.load_comparison(path)
    assert dict(zip(c.pairs["pair_id"], c.pairs["winner"])) == {"p4": "candidate", "p5": "baseline"}


def test_a_summary_older_than_its_verdicts_is_partial(sweep, tmp_path):
    """Judging again (new answers) appends rows after the old summary: until the new summary lands, the analysis
    does not present the old one's pairs as the complete comparison."""
    import os

    verdicts = sweep / "judgments" / "beta0.1_seed0.jsonl"
    summary = sweep / "judgments" / "beta0.1_seed0.summary.json"
    os.utime(summary, (1_000_000, 1_000_000))
    assert analyze_sweep.load_comparison(verdicts).state == "partial"
    os.utime(summary, None)
    assert analyze_sweep.load_comparison(verdicts).state == "complete"


def test_lc_is_not_reported_when_length_separates_wins_from_losses():
    """The candidate wins exactly the pairs where its answer is shorter: the GLM's maximum is at infinity, and a
    number printed from a penalised fit would be made up."""
    delta = np.arange(-20, 20)
    wins = (delta < 0).astype(float)
    lc = stats.lc_win_rate(wins, 100 + delta, np.full(delta.size, 100), n_boot=50)
    assert lc["lc_win_rate"] is None and "not identifiable" in lc["note"]
    # one outcome throughout: nothing for length to explain, LC is the raw rate
    assert stats.lc_win_rate(np.ones(40), 100 + delta, np.full(40, 100), n_boot=50)["lc_win_rate"] == 1.0


def test_best_run_is_among_completed_runs_and_ties_are_all_named(sweep, tmp_path):
    info = json.loads((sweep / "beta0.5_seed0" / "run.json").read_text())
    (sweep / "beta0.5_seed0" / "run.json").write_text(json.dumps({**info, "status": "running"}))
    analyse(sweep, tmp_path / "report")
    best = (tmp_path / "report" / "summary.md").read_text().split("Best run per criterion")[1]
    assert "beta0.5_seed0" not in best  # its margin is the largest, but it has not finished
    assert "| highest eval reward accuracy | beta0.1_seed0, beta0.1_seed1 | 0.7500 |" in best


def test_several_seeds_and_loss_types_are_all_drawn(tmp_path):
    s = tmp_path / "logs" / "grid"
    write_run(s, "sft", config("sft", loss="sft"), [{"step": 1, "split": "train", "loss": 2.0}])
    for loss in ("sigmoid", "ipo"):
        for beta in (0.1, 1):
            for seed in (0, 1, 2):
                name = f"{loss}_beta{beta}_seed{seed}"
                cfg = config(name, beta, seed)
                cfg["loss"]["type"] = loss
                write_run(s, name, cfg, dpo_rows(margin=lambda k, b=beta, sd=seed: 0.01 * k * (1 + sd) / b))
                write_judgments(s, name, ["candidate"] * (10 + seed) + ["baseline"] * 10, summary=True)
    table = analyse(s, tmp_path / "report")
    assert len(table) == 13 and set(table["loss"]) == {"sft", "sigmoid", "ipo"} and set(table["beta"].dropna()) == {0.1, 1}
    styles = analyze_sweep.run_styles(table[table["loss"] != "sft"].reset_index())
    assert len({(table.loc[r, "beta"], styles[r]) for r in table.index if r != "sft"}) == 12, "no run hidden behind another"
    for name in FIGURES[:5]:
        assert (tmp_path / "report" / "figures" / f"{name}.png").is_file()
    assert "β ∈ {0.1, 1}" in (tmp_path / "report" / "README.md").read_text()


def test_a_judge_no_better_than_chance_is_called_out(sweep, tmp_path):
    write_calibration(sweep, agreement=0.51, ci=(0.45, 0.57))
    analyse(sweep, tmp_path / "report")
    assert "not better than chance" in (tmp_path / "report" / "README.md").read_text()


def test_bad_inputs_get_one_line_errors(sweep, tmp_path, capsys):
    assert analyze_sweep.main(["--sweep", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert analyze_sweep.main(["--sweep", str(tmp_path / "empty")]) == 2
    assert "no runs here" in capsys.readouterr().err
    # a corrupt line in the middle of one run's metrics: that run is reported unreadable, the rest analysed
    path = sweep / "beta0.1_seed1" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    (sweep / "beta0.5_seed0" / "run.json").write_text("{")
    table = analyse(sweep, tmp_path / "report")
    out = capsys.readouterr().out
    assert f"{path}: line 4 is not valid JSON" in out
    assert "beta0.5_seed0/run.json: not readable JSON" in out
    assert table.loc["beta0.5_seed0", "status"] == "unreadable" and table.loc["beta0.1_seed0", "status"] == "completed"
    # a malformed verdict file, a corrupt sweep record: named, that comparison left out, the rest reported
    bad = sweep / "judgments" / "beta0.1_seed0.jsonl"
    bad.write_text(bad.read_text() + '{"no_key": 1}\n')
    (sweep / "sweep.json").write_text("[1, 2")
    table = analyse(sweep, tmp_path / "r2")
    out = capsys.readouterr().out
    assert f"{bad}: line 102 is not a judge.py verdict row (no 'key')" in out
    assert pd.isna(table.loc["beta0.1_seed0", "win_rate"]) and table.loc["beta0.1_seed1", "win_rate"] == 0.5
    report = (tmp_path / "r2" / "README.md").read_text()
    assert f"unreadable: {sweep / 'sweep.json'}: not readable JSON" in report and f"unreadable: {bad}: line 102" in report
    # a run folder with metrics and nothing else: tabled (beta unknown), named, never plotted against beta
    (sweep / "stray").mkdir()
    (sweep / "stray" / "metrics.jsonl").write_text(json.dumps(dpo_rows()[0]) + "\n")
    table = analyse(sweep, tmp_path / "r3")
    assert table.loc["stray", "status"] == "running" and pd.isna(table.loc["stray", "beta"])
    assert "stray: no config.yaml" in capsys.readouterr().out
    # --out naming a file
    (tmp_path / "afile").write_text("x")
    assert analyze_sweep.main(["--sweep", str(sweep), "--out", str(tmp_path / "afile")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_never_imports_torch_or_vllm(sweep, tmp_path):
    """Run in a fresh interpreter where importing torch, vllm or transformers raises."""
    result = analyse_without_torch("--sweep", sweep, "--out", tmp_path / "r", "--bootstrap", "50")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "r" / "README.md").is_file()


def write_eval_pairs(sweep, name, correct, n=200, margin=0.05, step=8, seed=0):
    """eval_pairs.jsonl as train_dpo.py writes it: `correct` of `n` pairs with chosen reward above rejected, margins
    drawn around `margin`; an earlier eval's rows (step 4) that the analysis must not read."""
    rng = np.random.default_rng(seed)
    with open(sweep / name / "eval_pairs.jsonl", "w") as fh:
        for s, k in ((4, n // 2), (step, correct)):
            for i in range(n):
                m = abs(rng.normal(margin, 0.05)) * (1 if i < k else -1)
                fh.write(json.dumps({"step": s, "pair_id": f"hh/{i}", "policy_chosen": -10.0, "policy_rejected": -11.0,
                                     "ref_chosen": -10.1, "ref_rejected": -10.9, "reward_chosen": m / 2,
                                     "reward_rejected": -m / 2, "margin": m, "correct": bool(m > 0)}) + "\n")


def test_significance_from_eval_pairs_and_the_statements_saying_it(tmp_path, capsys):
    s = tmp_path / "logs" / "sig"
    write_run(s, "sft", config("sft", loss="sft"), [{"step": 2, "split": "eval", "loss": 1.5}])
    for name, beta, correct in (("beta0.1_seed0", 0.1, 124), ("beta0.5_seed0", 0.5, 104)):
        write_run(s, name, config(name, beta), dpo_rows(accuracy=lambda k, c=correct: c / 200), eval_pairs=200)
        write_eval_pairs(s, name, correct)
    table = analyse(s, tmp_path / "out")
    strong, weak = table.loc["beta0.1_seed0"], table.loc["beta0.5_seed0"]
    assert (strong["eval_pairs"], strong["eval_correct"]) == (200, 124)  # the last eval's rows, not step 4's
    assert strong["eval_accuracy_p"] == pytest.approx(2 * binom_tail(124, 200), rel=1e-9)  # two-sided, exact
    assert 0.5 < strong["eval_accuracy_ci_low"] < 0.62 < strong["eval_accuracy_ci_high"] < 0.7  # two-sided
    assert strong["significant"] == "accuracy+margin"
    assert weak["eval_accuracy_p"] > 0.05 and weak["eval_accuracy_ci_low"] < 0.5
    report = (tmp_path / "out" / "README.md").read_text()
    first = report.split("## Read this first")[1].split("## Results")[0]
    assert "beta0.1_seed0: a real DPO effect on 200 held-out pairs" in first
    assert "beta0.5_seed0: not distinguishable from chance on 200 held-out pairs" in first
    paired = pd.read_csv(tmp_path / "out" / "paired_differences.csv").iloc[0]
    assert paired["pairs"] == 200 and paired["accuracy_diff"] == pytest.approx((124 - 104) / 200)
    assert paired["accuracy_diff_ci_low"] > 0  # 20 more right of the same 200 pairs, every one of them a ~ +0.1 shift
    assert "a real DPO effect" in capsys.readouterr().out


def binom_tail(k, n):
    """P(X >= k) for X ~ Binomial(n, 1/2), by hand."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def test_degenerate_answers_are_the_ones_that_loop():
    assert stats.is_degenerate("The F Word:\n\n" * 20)
    assert not stats.is_degenerate("I can't help with that, but here is what the law says about it in most places, "
                                    "and where you can read more about your rights as a tenant.")
    assert not stats.is_degenerate("Yes.")  # too short to tell


def test_objectives_group_apart_and_are_defined_in_the_report(tmp_path):
    """A grid over objectives: each (objective with its options) is its own group, never pooled as seeds; the
    report defines the loss and reward of every objective it trained."""
    s = tmp_path / "logs" / "objectives"
    write_run(s, "sft", config("sft", loss="sft"), [{"step": 1, "split": "train", "loss": 2.0}])
    variants = {"sigmoid": {"type": "sigmoid"}, "orpo": {"type": "orpo"},
                "sigmoid+sft": {"type": ["sigmoid", "sft"]}, "js": {"type": "sigmoid", "f_divergence": "js_divergence"},
                "mpo": {"type": ["sigmoid", "bco_pair", "sft"], "weights": [0.8, 0.2, 1.0]},
                "wpo": {"type": "ipo", "wpo": True, "sync_ref_every": 8}}
    for name, loss in variants.items():
        cfg = config(name, 0.1, 0)
        cfg["loss"].update(loss)
        write_run(s, name, cfg, dpo_rows(margin=lambda k: 0.01 * k))
    table = analyse(s, tmp_path / "report")
    assert set(table["loss"]) == {"sft", "sigmoid", "orpo", "sigmoid+sft", "sigmoid[js_divergence]",
                                  "0.8·sigmoid+0.2·bco_pair+sft", "ipo[wpo, tr-dpo 8/0.6]"}
    readme = (tmp_path / "report" / "README.md").read_text()
    for name in ("sigmoid", "orpo", "sft", "bco_pair", "ipo"):
        assert f"- `{name}` (" in readme
    assert "ORPO, Hong et al. 2024" in readme and "β·πc/|yc|" in readme  # ORPO's reward has no reference


def test_a_panel_soft_rates_style_control_power_and_injection_in_the_report(sweep, tmp_path, capsys):
    """A panel of two judges in choice mode, both orders, on 6 pairs (verdict rows with probabilities), its
    calibration with κ whose CI includes 0 and an injection probe in the summary. By hand, per pair, the panel's
    P(A) etc. are the two judges' means, the debiased rate the mean over the pairs of the two orders' soft scores."""
    folder = sweep / "judgments"
    for old in folder.glob("beta0.1_seed1*"):
        old.unlink()
    probs = {"j1": [(0.8, 0.1, 0.1), (0.7, 0.2, 0.1)], "j2": [(0.6, 0.3, 0.1), (0.5, 0.4, 0.1)]}
    rows, placed, debiased = [], {}, []
    for i in range(6):
        pid = f"mt_bench/q{i}#0"
        cand = "# Plan\n- step\n- **step**\n" * (i + 1)  # markdown-rich, longer each time
        entries = []
        soft = {}
        for position in ("A", "B"):
            keys = []
            for j, judge_name in enumerate(("j1", "j2")):
                p = probs[judge_name][0 if position == "A" else 1] if i % 2 else tuple(reversed(probs[judge_name][0][:2])) + (0.1,)
                key = f"{judge_name}-{pid}-{position}"
                keys.append(key)
                answer_a, answer_b = (cand, "short") if position == "A" else ("short", cand)
                rows.append({"key": key, "task": "compare", "pair_id": pid, "candidate_position": position,
                             "verdict": "A" if p[0] > p[1] else "B", "p_a": p[0], "p_b": p[1], "p_tie": p[2],
                             "answer_a": answer_a, "answer_b": answer_b, "candidate_chars": len(cand),
                             "baseline_chars": 5, "template_version": f"t@{j}", "timestamp": "2026-01-01T00:00:00"})
            mean = [(rows[-2][k] + rows[-1][k]) / 2 for k in ("p_a", "p_b", "p_tie")]
            soft[position] = (mean[0] if position == "A" else mean[1]) + mean[2] / 2
            entries.append([position, keys])
        placed[pid] = entries
        debiased.append((soft["A"] + soft["B"]) / 2)
    with open(folder / "beta0.1_seed1.jsonl", "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    inter = [{"judges": ["j1@hh-v1", "j2@mt-bench-v2"], "judgments": 12, "kappa": 0.25, "kappa_ci": [-0.1, 0.6],
              "agreement": 0.7}]
    (folder / "beta0.1_seed1.summary.json").write_text(json.dumps({
        "judge_model": "panel (mean) of j1@hh-v1, j2@mt-bench-v2", "template_version": "t@0+t@1", "mode": "choice",
        "order": "both", "seed": 0, "panel_combine": "mean", "candidate": {"model_name": "beta0.1_seed1"},
        "baseline": {"model_name": "sft"}, "n": 6, "judged_pairs": placed,
        "panel": {"combine": "mean", "members": [{"name": "j1@hh-v1", "calibration": {"agreement": 0.5, "kappa": 0.0}},
                                                 {"name": "j2@mt-bench-v2", "calibration": {"agreement": 0.6}}],
                  "inter_judge": inter},
        "injection": {"pairs": 2, "judgments": 24, "flip_rate": 0.25, "kinds": {
            "fake_verdict": {"judgments": 4, "flipped": 1, "flip_rate": 0.25, "toward_candidate": 1, "errors": 0}}}}))
    (folder / "calibration.summary.json").write_text(json.dumps({"calibration": {
        "pairs": 30, "agreement": 0.55, "agreement_ci": [0.45, 0.65], "kappa": 0.05, "kappa_ci": [-0.1, 0.2],
        "debiased_verdict_agreement": 0.6, "debiased_verdict_agreement_ci": [0.5, 0.7], "weighted_agreement": 0.51,
        "debiased_agreement": 0.52, "sets": {"llmbar:Natural": {"pairs": 30, "agreement": 0.55, "kappa": 0.05,
                                                                "kappa_ci": [-0.1, 0.2], "agreement_ci": [0.45, 0.65]}},
        "panel": {"members": [{"name": "j1@hh-v1", "calibration": {"agreement": 0.5, "kappa": 0.0}}],
                  "inter_judge": inter}}}))
    table = analyse(sweep, tmp_path / "report")
    r = table.loc["beta0.1_seed1"]
    assert r["debiased_win_rate"] == pytest.approx(np.mean(debiased)) and r["judged"] == 6
    assert r["debiased_ci_low"] <= r["debiased_win_rate"] <= r["debiased_ci_high"]
    assert 0 <= r["weighted_win_rate"] <= 1 and pd.notna(r["bt_sc_score"]) and pd.notna(r["detectable"])
    report = (tmp_path / "report" / "README.md").read_text()
    read_first = report.split("## Read this first")[1].split("## Results")[0]
    assert "Cohen's κ between the judge and the human labels is +0.050 [-0.100, +0.200]: its 95% CI includes 0" in read_first
    assert "Debiasing raises the judge's agreement with human labels: 55.0% [45.0, 65.0]" in read_first
    assert "prompts this sweep can detect a win-rate difference of ±" in read_first
    for heading in ("### Judge calibration", "### Judge panel", "### How many prompts", "### Prompt injection",
                    "style-controlled [95% CI]"):
        assert heading in report, heading
    assert "| beta0.1_seed1 | 2 | 25% | 25% |" in report
    assert "Between j1@hh-v1 and j2@mt-bench-v2: κ +0.250 [-0.100, +0.600]" in report
    assert (tmp_path / "report" / "power_between_runs.csv").is_file()
    assert "debiased" in capsys.readouterr().out


def test_seeds_give_each_beta_a_mean_and_spread_and_the_report_says_when_beta_is_within_it(tmp_path, capsys):
    """β 0.1: seeds at accuracy 0.60 and 0.80 (mean 0.70, sd 0.1414, range 0.20); β 0.5: 0.70 and 0.72 (mean 0.71).
    The β means differ by 0.01, less than the 0.20 the seeds of one β differ by: said. The margins, 0.4 at β 0.1
    against 2.0 at β 0.5 with no spread at all, are a β effect: not said."""
    s = tmp_path / "logs" / "seeds"
    write_run(s, "sft", config("sft", loss="sft"), [{"step": 1, "split": "train", "loss": 2.0}])
    for beta, accuracies, margin in ((0.1, (0.60, 0.80), 0.05), (0.5, (0.70, 0.72), 0.25)):
        for seed, acc in enumerate(accuracies):
            name = f"beta{beta:g}_seed{seed}"
            write_run(s, name, config(name, beta, seed), dpo_rows(accuracy=lambda k, a=acc: a,
                                                                  margin=lambda k, m=margin: m * k))
    analyse(s, tmp_path / "report")
    per_beta = pd.read_csv(tmp_path / "report" / "per_beta.csv").set_index("beta")
    assert per_beta.loc[0.1, "seeds"] == 2 and per_beta.loc[0.1, "eval_accuracy_mean"] == pytest.approx(0.70)
    assert per_beta.loc[0.1, "eval_accuracy_sd"] == pytest.approx(0.141421, abs=1e-5)
    assert (per_beta.loc[0.1, "eval_accuracy_min"], per_beta.loc[0.1, "eval_accuracy_max"]) == pytest.approx((0.6, 0.8))
    report = (tmp_path / "report" / "README.md").read_text()
    read_first = report.split("## Read this first")[1].split("## Results")[0]
    assert ("sigmoid: the β effect on the eval reward accuracy (β means 0.700–0.710, a range of 0.010) is smaller than "
            "the spread over seeds (0.200 within one β)") in read_first
    assert "effect on the eval reward margin" not in read_first
    assert "### Per β over seeds" in report and "| sigmoid | 0.1 | 2 | 0.700 ± 0.141 [0.600, 0.800] |" in report


def test_the_cost_records_by_hand(tmp_path):
    """costs.py: a local job's two attempts (each its own line); a Slurm job on 2 nodes with 4 GPUs each, requeued
    once (two attempts: 100 s then 50 s of wall, per node); and sacct's records for another job, which win over its
    own. GPU-hours = 2 nodes · 4 GPUs · (100 + 50) s / 3600 = 0.3333."""
    import costs

    sweep = tmp_path / "s"
    (sweep / "costs").mkdir(parents=True)
    local = [{"key": "generate/sft", "elapsed_s": 36.0, "cpu_s": 70.0, "max_rss_gb": 1.5, "cpus": 2, "gpus": 0,
              "job_id": "", "requeues": 0}] * 2
    slurm = [{"key": "beta0.1_seed0", "elapsed_s": e, "cpu_s": 10.0, "max_rss_gb": 3.0, "cpus": 8, "gpus": 4,
              "job_id": "7_0", "requeues": r, "node": n} for r, e in ((0, 100.0), (1, 50.0)) for n in (0, 1)]
    own = [{"key": "judge/beta0.1_seed0", "elapsed_s": 999.0, "cpu_s": 1.0, "cpus": 1, "gpus": 0, "job_id": "8"}]
    for key, rows in (("generate__sft", local), ("beta0.1_seed0", slurm), ("judge__beta0.1_seed0", own)):
        (sweep / "costs" / f"{key}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{torn")
    (sweep / "sweep.json").write_text(json.dumps({"jobs": {"judge/beta0.1_seed0": {"job_id": "8", "sacct": {"records": [
        {"elapsed_s": 60.0, "cpu_s": 100.0, "max_rss_gb": 2.0, "cpus": 2, "gpus": 1},
        {"elapsed_s": 30.0, "cpu_s": 50.0, "max_rss_gb": 2.5, "cpus": 2, "gpus": 1}]}}}}))
    jobs = costs.job_costs(sweep)
    gen, train, judged = jobs["generate/sft"], jobs["beta0.1_seed0"], jobs["judge/beta0.1_seed0"]
    assert (gen.attempts, gen.elapsed_s, gen.cpu_hours, gen.gpu_hours) == (2, 72.0, pytest.approx(144 / 3600), 0.0)
    assert (train.attempts, train.elapsed_s, train.requeues) == (2, 150.0, 1)
    assert train.gpu_hours == pytest.approx(2 * 4 * 150 / 3600) and train.hours == train.gpu_hours
    assert (judged.source, judged.elapsed_s, judged.cpu_s, judged.requeues) == ("sacct", 90.0, 150.0, 1)
    assert judged.gpu_hours == pytest.approx(90 / 3600) and judged.max_rss_gb == 2.5
    assert (train.stage, train.run, judged.stage, judged.run, gen.run) == ("dpo", "beta0.1_seed0", "judge",
                                                                           "beta0.1_seed0", "sft")
    total = costs.stage_costs(jobs)[-1]
    assert total["what"] == "total" and total["hours"] == pytest.approx(gen.cpu_hours + train.gpu_hours + judged.gpu_hours)
    assert costs.run_costs(jobs)["beta0.1_seed0"]["jobs"] == 2
    left, unknown = costs.estimate_left(jobs, {"dpo": 3, "analyze": 1})
    assert left == pytest.approx(3 * train.gpu_hours) and unknown == ["analyze"]
    line = costs.cost_line(jobs, {"dpo": 3, "analyze": 1})
    assert line.startswith("cost so far: ") and "GPU-hours over 3 job(s) (job, sacct)" in line
    assert f"left: 4 job(s), ~{3 * train.gpu_hours:.3f} GPU-hours at their stages' means (1 in analyze: no finished " \
           f"job of that stage to go by yet)" in line


def test_a_pruned_run_is_reported_with_its_reason_and_step(sweep, tmp_path):
    write_run(sweep, "beta3_seed0", config("beta3_seed0", 3.0), dpo_rows(steps=3, eval_at=(), margin=lambda k: -20.0 * k),
              status="pruned", pruned={"reason": "margin collapse: rewards/margins below -10 for 2 train logs in a row",
                                       "step": 3})
    table = analyse(sweep, tmp_path / "report")
    assert table.loc["beta3_seed0", "status"] == "pruned"
    report = (tmp_path / "report" / "README.md").read_text()
    state = report.split("## State")[1].split("##")[0]
    assert "**beta3_seed0**: pruned at step 3/8: margin collapse: rewards/margins below -10 for 2 train logs" in state
    best = report.split("### Best run per criterion")[1].split("###")[0]
    assert "beta3_seed0" not in best, "a pruned run is never the best"
