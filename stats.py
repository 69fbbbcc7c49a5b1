"""The statistics of judge verdicts, shared by judge.py (its summaries) and analyze_sweep.py (its tables), so the two
compute a win rate the same way. No torch, no engines: numpy, pandas and (for the fits) statsmodels.

    winner = unswap(verdict, candidate_position)        # A/B/tie/error as the judge saw it -> the pair's roles
    outcome = combine([winner_1, winner_2])             # both orders: disagreement is a tie (FastChat)
    rate, ci = mean([SCORE[w] for w in outcomes]), bootstrap_ci(scores)
    lc = lc_win_rate(scores, candidate_chars, baseline_chars)       # AlpacaEval 2's length-controlled rate
    table = bradley_terry(battles, anchor="sft")                    # Arena-Hard-Auto's ranking

"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

SCORE = {"candidate": 1.0, "tie": 0.5, "baseline": 0.0}
"""What a pair's outcome counts for the candidate: ties count 1/2."""
POSITION_SCORE = {"A": 1.0, "tie": 0.5, "B": 0.0}
BOOTSTRAP = 10_000
ELO_SCALE, ELO_BASE, ELO_ANCHOR = 400.0, 10.0, 1000.0  # Arena-Hard-Auto's scale: the anchor (SFT) is 1000
RIDGE = 1e-4  # only when a player wins or loses every battle: keeps that score finite instead of infinite


# ---------------------------------------------------------------- verdicts to outcomes


def unswap(verdict: str, candidate_position: str) -> str:
    """A verdict about positions (A, B, tie, error) as an outcome for the pair (candidate, baseline, tie, error)."""
    if verdict in ("tie", "error"):
        return verdict
    return "candidate" if verdict == candidate_position else "baseline"


def combine(winners: list[str]) -> str:
    """One pair's outcome from its judgments: any error is an error; two orders that disagree are a tie
    (FastChat's rule for MT-Bench pairwise judging)."""
    if "error" in winners:
        return "error"
    return winners[0] if len(set(winners)) == 1 else "tie"


def mean(values, digits: int | None = None) -> float | None:
    """The mean of the values that are not None (None when there are none), rounded to `digits` if given."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    m = sum(values) / len(values)
    return round(m, digits) if digits is not None else m


def first_position_rate(verdicts) -> float | None:
    """Share of verdicts for position A (ties 1/2), over the judgments the judge was actually asked (identical
    answers tied without a call and errors say nothing about position)."""
    return mean([POSITION_SCORE[v] for v in verdicts if v in POSITION_SCORE])


def order_consistency(both_orders) -> float | None:
    """Share of pairs judged in both orders whose two judgments name the same winner; `both_orders` holds the two
    winners of each such pair."""
    return mean([1.0 if w[0] == w[1] else 0.0 for w in both_orders])


# ---------------------------------------------------------------- intervals and fits


def bootstrap_ci(scores, seed: int = 0, level: float = 0.95, n: int = BOOTSTRAP) -> list[float] | None:
    """Percentile bootstrap of the mean over pairs (the unit that was sampled), rounded to 4 decimals."""
    scores = np.asarray(scores, dtype=float)
    if scores.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, scores.size, size=(n, scores.size))].mean(axis=1)
    return [round(float(q), 4) for q in np.quantile(means, [(1 - level) / 2, (1 + level) / 2])]


def logit_fit(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, bool]:
    """(coefficients, separated) of a logistic GLM of y in [0, 1] (ties are 1/2) on X. Under perfect separation (a
    side that always wins) the maximum is at infinity: then a tiny ridge penalty gives finite coefficients, and
    separated=True says they are not maximum-likelihood estimates."""
    # statsmodels takes a second to import: judge.py, which only bootstraps, does not pay for it
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import PerfectSeparationWarning

    model = sm.GLM(y, X, family=sm.families.Binomial())
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerfectSeparationWarning)
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        try:
            params = np.asarray(model.fit().params)
            if np.all(np.isfinite(params)) and np.all(np.abs(params) < 20):
                return params, False
        except (PerfectSeparationWarning, np.linalg.LinAlgError, ValueError):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(model.fit_regularized(alpha=RIDGE, L1_wt=0.0).params), True


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def lc_win_rate(scores, candidate_len, baseline_len, seed: int = 0, n_boot: int = 1000, level: float = 0.95) -> dict:
    """Length-controlled win rate, AlpacaEval 2's length_controlled_v1 GLM without the instruction-difficulty term
    (that term needs many models on one instruction set):
        logit P(candidate wins) = theta + phi * tanh(delta_len / sd(delta_len)),  delta_len = len(cand) - len(base)
    and LC = sigmoid(theta), the win rate predicted at equal lengths. Ties count 1/2. CI: percentile bootstrap over
    pairs (the GLM refit on each resample). scores, lengths: (n,) arrays."""
    y = np.asarray(scores, dtype=float)
    delta = np.asarray(candidate_len, dtype=float) - np.asarray(baseline_len, dtype=float)
    if y.size < 3 or not np.std(delta) > 0 or np.ptp(y) == 0:
        return {"lc_win_rate": float(y.mean()) if y.size else None, "lc_ci": bootstrap_ci(y, seed), "theta": None,
                "phi": None, "note": "nothing for length to explain (equal lengths or one outcome): LC = win rate"}
    x = np.tanh(delta / np.std(delta, ddof=1))

    def fit(idx):
        return logit_fit(np.column_stack([np.ones(idx.size), x[idx]]), y[idx])

    (theta, phi), separated = fit(np.arange(y.size))
    if separated:
        return {"lc_win_rate": None, "lc_ci": None, "theta": None, "phi": None,
                "note": "answer length separates wins from losses: the length-controlled rate is not identifiable"}
    rng = np.random.default_rng(seed)
    boot = [fit(rng.integers(0, y.size, y.size)) for _ in range(n_boot)]
    kept = np.array([_sigmoid(params[0]) for params, sep in boot if not sep])
    ci = None
    if kept.size >= 0.9 * n_boot:  # resamples that separate have no estimate; too many and there is no interval
        ci = [float(q) for q in np.quantile(kept, [(1 - level) / 2, (1 + level) / 2])]
    return {"lc_win_rate": float(_sigmoid(theta)), "lc_ci": ci, "theta": float(theta), "phi": float(phi),
            "note": "" if ci else f"{n_boot - kept.size} of {n_boot} resamples separate: no interval"}


def bradley_terry(battles: pd.DataFrame, anchor: str, seed: int = 0, n_boot: int = 1000, level: float = 0.95) -> pd.DataFrame:
    """Bradley-Terry scores from battles (columns model_a, model_b, score: 1 a won, 0 b won, 1/2 tie), as
    Arena-Hard-Auto fits them: a logistic regression of the outcome on +1 (a) / -1 (b) player indicators with no
    intercept, P(a beats b) = sigmoid(s_a - s_b), on the Elo scale 1000 + 400 log10(odds against the anchor).
    Intervals: percentile bootstrap over battles. Returns one row per player: model, score, ci_low, ci_high, battles."""
    players = sorted(set(battles["model_a"]) | set(battles["model_b"]))
    others = [p for p in players if p != anchor]
    index = {p: i for i, p in enumerate(others)}
    X = np.zeros((len(battles), len(others)))
    for row, (a, b) in enumerate(zip(battles["model_a"], battles["model_b"])):
        if a in index:
            X[row, index[a]] += 1.0
        if b in index:
            X[row, index[b]] -= 1.0
    y = battles["score"].to_numpy(dtype=float)
    to_elo = ELO_SCALE / math.log(ELO_BASE)

    def fit(idx):
        return ELO_ANCHOR + to_elo * logit_fit(X[idx], y[idx])[0] if others else np.zeros(0)

    point = fit(np.arange(len(y)))
    rng = np.random.default_rng(seed)
    boot = np.array([fit(rng.integers(0, len(y), len(y))) for _ in range(n_boot)]).reshape(n_boot, len(others))
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0) if others else ([], [])
    counts = pd.concat([battles["model_a"], battles["model_b"]]).value_counts()
    table = [{"model": anchor, "score": ELO_ANCHOR, "ci_low": ELO_ANCHOR, "ci_high": ELO_ANCHOR,
              "battles": int(counts.get(anchor, 0))}]
    table += [{"model": p, "score": float(point[i]), "ci_low": float(lo[i]), "ci_high": float(hi[i]),
               "battles": int(counts.get(p, 0))} for p, i in index.items()]
    return pd.DataFrame(table).sort_values("score", ascending=False).reset_index(drop=True)


def distinct_ngram_ratio(text: str, n: int = 3) -> float | None:
    """Share of an answer's word n-grams that are distinct: ~0.95 for prose, near 0 for an answer that loops
    ("The F Word:\n\n" twenty times). None for answers too short to tell (fewer than 4n words)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if len(words) >= 4 * n else None


DEGENERATE_BELOW = 0.5
"""An answer is degenerate (it repeats itself) when fewer than half of its word 3-grams are distinct."""


def is_degenerate(text: str) -> bool:
    ratio = distinct_ngram_ratio(text)
    return ratio is not None and ratio < DEGENERATE_BELOW
