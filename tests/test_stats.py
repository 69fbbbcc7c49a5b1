"""stats.py's judge statistics, each against numbers worked out by hand in the docstring: Cohen's κ, the power
calculation, the soft and position-debiased preferences, a panel's combined judgment, the style features and
Bradley-Terry with style control (on simulated battles whose truth is known)."""
import math

import numpy as np
import pandas as pd
import pytest

import stats


def row(p_a, p_b, p_tie, verdict=None):
    """A choice-mode judgment with these probabilities (its verdict the most likely letter unless given)."""
    verdict = verdict or max(zip((p_a, p_b, p_tie), ("A", "B", "tie")))[1]
    return {"verdict": verdict, "p_a": p_a, "p_b": p_b, "p_tie": p_tie}


def test_cohen_kappa_by_hand():
    """Judge A A A A B B tie tie against humans A A B B B B A tie:
    p_o = agreements / n = (A,A ×2) + (B,B ×2) + (tie,tie ×1) = 5 / 8 = 0.625;
    judge frequencies A 4/8, B 2/8, tie 2/8; human A 3/8, B 4/8, tie 1/8;
    p_e = 4/8·3/8 + 2/8·4/8 + 2/8·1/8 = (12 + 8 + 2) / 64 = 22/64 = 0.34375;
    κ = (0.625 − 0.34375) / (1 − 0.34375) = 0.28125 / 0.65625 = 0.428571…"""
    judge = ["A", "A", "A", "A", "B", "B", "tie", "tie"]
    human = ["A", "A", "B", "B", "B", "B", "A", "tie"]
    assert stats.cohen_kappa(judge, human) == pytest.approx(0.28125 / 0.65625)
    assert stats.cohen_kappa(human, human) == 1.0
    assert stats.cohen_kappa(["A", "B"] * 5, ["B", "A"] * 5) == pytest.approx(-1.0), "always the opposite: κ = -1"
    assert stats.cohen_kappa(["A"] * 6, ["A", "B"] * 3) == 0.0, "a judge that always says A agrees by chance only"
    assert stats.cohen_kappa(["A"] * 4, ["A"] * 4) is None, "p_e = 1: undefined"
    assert stats.cohen_kappa([], []) is None


def test_grouped_bootstrap_keeps_a_pairs_judgments_together():
    """Each group holds a pair's two judgments; the statistic sees whole groups, never one judgment of a pair."""
    groups = [[("A", "A"), ("B", "B")], [("A", "B"), ("B", "A")], [("A", "A"), ("B", "A")]] * 5
    seen = []

    def statistic(items):
        seen.append(len(items))
        return stats.cohen_kappa([a for a, _ in items], [b for _, b in items])

    ci = stats.grouped_bootstrap_ci(groups, statistic, seed=0, n=200)
    assert set(seen) == {30} and len(seen) == 200, "15 groups of 2 judgments each time"
    assert ci[0] < stats.cohen_kappa(*zip(*[i for g in groups for i in g])) < ci[1]
    assert stats.grouped_bootstrap_ci(groups[:1], statistic) is None, "one group: no interval"


def test_power_by_hand():
    """z_0.975 = 1.959964, z_0.8 = 0.841621, sum 2.801585.
    sd 0.5, 64 prompts: detectable = 2.801585 · 0.5 / 8 = 0.175099 (±17.5 points).
    To detect 10 points at sd 0.5: (2.801585 · 0.5 / 0.1)² = 14.007925² = 196.22 -> 197 prompts.
    Scores 1, 0, 1, 0.5 (mean 0.625, sd = sqrt((.375² + .625² + .375² + .125²) / 3) = sqrt(0.6875 / 3)
    = 0.478714): effect +0.125, needs (2.801585 · 0.478714 / 0.125)² = 10.72921² = 115.12 -> 116 prompts."""
    assert stats.detectable_difference(0.5, 64) == pytest.approx(0.175099, abs=1e-6)
    assert stats.prompts_needed(0.5, 0.1) == 197
    assert stats.prompts_needed(0.5, -0.1) == 197, "a difference either way"
    assert stats.prompts_needed(0.5, 0.0) is None
    plan = stats.power_plan([1.0, 0.0, 1.0, 0.5])
    assert plan["n"] == 4 and plan["effect"] == pytest.approx(0.125) and plan["sd_source"] == "measured"
    assert plan["sd"] == pytest.approx(0.4787, abs=1e-4) and plan["needed"] == 116
    assert plan["detectable"] == pytest.approx(2.801585 * 0.478714 / 2, abs=1e-5)


def test_power_without_spread_plans_with_the_worst_case():
    """Every pair a tie (the stand-in judge): sd 0 would claim any difference is detectable; the plan takes the
    largest sd scores in [0, 1] can have (0.5) and says so; differences of two runs (in [-1, 1]) take 1."""
    plan = stats.power_plan([0.5] * 64)
    assert plan["sd"] == 0.5 and plan["sd_source"].startswith("worst case") and plan["needed"] is None
    assert plan["detectable"] == pytest.approx(0.175099, abs=1e-6)
    assert stats.power_plan([0.0] * 64, null=0.0, worst_sd=1.0)["detectable"] == pytest.approx(0.350198, abs=1e-6)
    assert stats.power_plan([])["n"] == 0 and stats.power_plan([])["detectable"] is None


def test_soft_and_debiased_preferences_by_hand():
    """Candidate in A: P(A) 0.9, P(B) 0.05, P(tie) 0.05 -> soft 0.9 + 0.025 = 0.925.
    Candidate in B: P(A) 0.8, P(B) 0.15, P(tie) 0.05 -> soft 0.15 + 0.025 = 0.175.
    Debiased: candidate (0.9 + 0.15)/2 = 0.525, baseline (0.05 + 0.8)/2 = 0.425, tie 0.05; preference
    0.525 + 0.025 = 0.55 = (0.925 + 0.175)/2. A judge that always says A would have given 0.925 or 0.175 by the
    draw; debiased, the candidate is slightly preferred, and that is its most likely outcome."""
    a_first, b_first = row(0.9, 0.05, 0.05), row(0.8, 0.15, 0.05)
    assert stats.soft_score(a_first, "A") == pytest.approx(0.925)
    assert stats.soft_score(b_first, "B") == pytest.approx(0.175)
    p = stats.debiased_probabilities({"A": a_first, "B": b_first})
    assert p == pytest.approx({"candidate": 0.525, "baseline": 0.425, "tie": 0.05})
    assert stats.debiased_preference({"A": a_first, "B": b_first}) == pytest.approx(0.55)
    assert stats.most_likely(p) == "candidate"
    assert stats.most_likely({"candidate": 0.45, "baseline": 0.45, "tie": 0.1}) == "tie", "level: tie"
    assert stats.debiased_preference({"A": a_first}) is None, "one order: nothing to debias"
    assert stats.soft_score({"verdict": "A", "raw_outputs": ["[[A]]"]}, "A") is None, "generate mode: no probabilities"
    assert stats.soft_score({"verdict": "tie", "identical_answers": True}, "B") == 0.5


def test_expected_agreement_by_hand():
    """P(A) 0.6, P(B) 0.3, P(tie) 0.1 against a human 'A': 0.6·1 + 0.3·0 + 0.1·0.5 = 0.65; against 'tie':
    0.6·0.5 + 0.3·0.5 + 0.1·1 = 0.55."""
    judgment = row(0.6, 0.3, 0.1)
    assert stats.expected_match(judgment, "A") == pytest.approx(0.65)
    assert stats.expected_match(judgment, "tie") == pytest.approx(0.55)
    assert stats.expected_match(judgment, "B") == pytest.approx(0.35)


def test_a_panel_by_hand():
    """mean: (0.6, 0.3, 0.1) and (0.2, 0.5, 0.3) -> (0.4, 0.4, 0.2): A and B level, a tie; with a third judge
    (0.7, 0.2, 0.1) -> (0.5, 1/3, 0.2): A. majority: A, B -> no majority, a tie; A, B, A -> A."""
    one, two, three = row(0.6, 0.3, 0.1), row(0.2, 0.5, 0.3), row(0.7, 0.2, 0.1)
    both = stats.panel_judgment([one, two], "mean")
    assert both["verdict"] == "tie" and both["p_a"] == pytest.approx(0.4) and both["members"] == 2
    assert stats.panel_judgment([one, two, three], "mean")["verdict"] == "A"
    assert stats.panel_judgment([one, two], "majority")["verdict"] == "tie"
    assert stats.panel_judgment([one, two, three], "majority") == {"verdict": "A", "members": 3}
    assert stats.panel_judgment([one, {"verdict": "error"}, None], "mean")["members"] == 1, "errors left out, counted"
    assert stats.panel_judgment([None, {"verdict": "error"}], "mean") == {"verdict": "error", "members": 0}
    generated = [{"verdict": "B", "raw_outputs": []}, {"verdict": "B", "raw_outputs": []}, {"verdict": "A"}]
    assert stats.panel_judgment(generated, "mean")["verdict"] == "B", "no probabilities: a vote"


def test_placed_judgments_reads_a_single_judge_and_a_panel():
    rows = {"k1": {"key": "k1", "verdict": "A", "p_a": 0.7, "p_b": 0.2, "p_tie": 0.1, "answer_a": "x"},
            "k2": {"key": "k2", "verdict": "B", "p_a": 0.1, "p_b": 0.8, "p_tie": 0.1, "answer_a": "x"}}
    single = stats.placed_judgments([["B", "k1"]], rows)
    assert single[0]["winner"] == "baseline" and single[0]["candidate_position"] == "B"
    panel = stats.placed_judgments([["A", ["k1", "k2"]], ["B", ["k1", "missing"]]], rows, "mean")
    assert panel[0]["p_a"] == pytest.approx(0.4) and panel[0]["verdict"] == "B" and panel[0]["winner"] == "baseline"
    assert panel[0]["answer_a"] == "x", "the pair's fields come with the panel's judgment"
    assert panel[1]["members"] == 1 and panel[1]["winner"] == "baseline"
    assert stats.placed_judgments([["A", "nope"]], rows) == [None]


def test_style_features_by_hand():
    text = ("# Title\n## Part\nIntro with **bold** and __also bold__.\n- one\n- two\n1. first\n2) second\n"
            "```python\n# a comment, not a header\n- not a list\n**not bold**\n```\n")
    assert stats.style_of(text) == {"length": len(text), "headers": 2, "lists": 4, "bold": 2}
    diff = stats.style_differences("# A\n- x\n- y\n", "plain text")
    assert diff["headers"] == 1.0 and diff["lists"] == 1.0 and diff["bold"] == 0.0, "(1 - 0) / (1 + 0); 0/0 -> 0"
    assert diff["length"] == pytest.approx((12 - 10) / 22)


def test_style_control_takes_a_length_advantage_out_of_the_ranking():
    """Simulated: the DPO run is no stronger than SFT at equal length (s = 0), but the judge prefers longer answers
    (γ = 1.5 per sd of the length difference) and the run's answers are longer on average. Plain Bradley-Terry
    credits the run with the length; with length as a style covariate its score comes back near 1000 and γ near
    1.5."""
    rng = np.random.default_rng(0)
    n = 3000
    length = rng.normal(0.3, 0.3, n)  # (len_run - len_sft) / (len_run + len_sft): the run is longer on average
    z = length / length.std()
    wins = rng.random(n) < 1 / (1 + np.exp(-1.5 * z))
    battles = pd.DataFrame({"model_a": "dpo", "model_b": "sft", "score": wins.astype(float), "length": length,
                            "headers": 0.0, "lists": 0.0, "bold": 0.0})
    plain = stats.bradley_terry(battles, "sft", n_boot=20).set_index("model")
    styled = stats.bradley_terry(battles, "sft", n_boot=20, style=stats.STYLE_FEATURES)
    assert plain.loc["dpo", "score"] > 1150, "uncontrolled, the length advantage shows as strength"
    assert abs(styled.set_index("model").loc["dpo", "score"] - 1000) < 40
    assert styled.attrs["style"]["length"] == pytest.approx(1.5, abs=0.2)
    assert set(styled.attrs["style"]) == {"length"}, "constant features are left out"
    assert math.isfinite(styled.set_index("model").loc["dpo", "ci_low"])
