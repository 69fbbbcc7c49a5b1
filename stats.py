"""The statistics of judge verdicts, shared by judge.py (its summaries) and analyze_sweep.py (its tables), so the two
compute a win rate the same way. No torch, no engines: numpy, pandas and (for the fits) statsmodels.

    winner = unswap(verdict, candidate_position)        # A/B/tie/error as the judge saw it -> the pair's roles
    outcome = combine([winner_1, winner_2])             # both orders: disagreement is a tie (FastChat)
    rate, ci = mean([SCORE[w] for w in outcomes]), bootstrap_ci(scores)
    lc = lc_win_rate(scores, candidate_chars, baseline_chars)       # AlpacaEval 2's length-controlled rate
    table = bradley_terry(battles, anchor="sft")                    # Arena-Hard-Auto's ranking
    table = bradley_terry(battles, "sft", style=STYLE_FEATURES)     # ... with style control (length, markdown)
    soft = soft_score(p_a, p_b, p_tie, candidate_position)          # P(candidate) + P(tie)/2 of one judgment
    kappa = cohen_kappa(judge_labels, human_labels)                 # agreement beyond chance
    plan = power_plan(scores)                                       # prompts needed, detectable difference
    row = panel_judgment([row_1, row_2], "mean")                    # a panel of judges as one judge

"""
from __future__ import annotations

import math
import re
import warnings
from statistics import NormalDist

import numpy as np
import pandas as pd

SCORE = {"candidate": 1.0, "tie": 0.5, "baseline": 0.0}
"""What a pair's outcome counts for the candidate: ties count 1/2."""
POSITION_SCORE = {"A": 1.0, "tie": 0.5, "B": 0.0}
LABELS = ("A", "B", "tie")
"""A judgment's label in position terms: the judge's verdict, or the position of the answer a human preferred."""
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


def bradley_terry(battles: pd.DataFrame, anchor: str, seed: int = 0, n_boot: int = 1000, level: float = 0.95,
                  style: tuple[str, ...] = ()) -> pd.DataFrame:
    """Bradley-Terry scores from battles (columns model_a, model_b, score: 1 a won, 0 b won, 1/2 tie), as
    Arena-Hard-Auto fits them: a logistic regression of the outcome on +1 (a) / -1 (b) player indicators with no
    intercept, P(a beats b) = sigmoid(s_a - s_b), on the Elo scale 1000 + 400 log10(odds against the anchor).
    Intervals: percentile bootstrap over battles. Returns one row per player: model, score, ci_low, ci_high, battles.

    style: battle columns of style differences (style_differences: (f_a - f_b)/(f_a + f_b) per feature) added as
    covariates, Arena-Hard-Auto's --style-control (Li et al. 2024, "Does style matter?"): logit P = s_a - s_b + γ·z.
    Each column is divided by its standard deviation but not centred: every battle here has the DPO run on side a,
    so centring would give each run back its uncontrolled score; uncentred, s is the strength at equal style.
    The table's attrs["style"] holds γ per feature kept (a constant or collinear one is left out)."""
    players = sorted(set(battles["model_a"]) | set(battles["model_b"]))
    others = [p for p in players if p != anchor]
    index = {p: i for i, p in enumerate(others)}
    X = np.zeros((len(battles), len(others)))
    for row, (a, b) in enumerate(zip(battles["model_a"], battles["model_b"])):
        if a in index:
            X[row, index[a]] += 1.0
        if b in index:
            X[row, index[b]] -= 1.0
    kept = []
    for name in style:  # a feature that is constant, or a mix of the players' indicators and the features before
        column = battles[name].to_numpy(dtype=float)  # it (one run's answers all longer by the same share), is
        sd = column.std() if len(column) else 0.0     # left out: its coefficient would not be identifiable
        if sd > 0 and np.linalg.matrix_rank(np.column_stack([X, column / sd])) > X.shape[1]:
            X = np.column_stack([X, column / sd])
            kept.append(name)
    y = battles["score"].to_numpy(dtype=float)
    to_elo = ELO_SCALE / math.log(ELO_BASE)

    def fit(idx):
        if not X.shape[1]:
            return np.zeros(0)
        if np.linalg.matrix_rank(X[idx]) < X.shape[1]:  # a resample without some player's (or feature's) battles
            return np.full(X.shape[1], np.nan)          # identifies nothing about it: left out of the interval
        return logit_fit(X[idx], y[idx])[0]

    params = fit(np.arange(len(y)))
    point = ELO_ANCHOR + to_elo * params[:len(others)]
    rng = np.random.default_rng(seed)
    boot = np.array([ELO_ANCHOR + to_elo * fit(rng.integers(0, len(y), len(y)))[:len(others)]
                     for _ in range(n_boot)]).reshape(n_boot, len(others))
    lo, hi = np.nanquantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0) if others else ([], [])
    counts = pd.concat([battles["model_a"], battles["model_b"]]).value_counts()
    table = [{"model": anchor, "score": ELO_ANCHOR, "ci_low": ELO_ANCHOR, "ci_high": ELO_ANCHOR,
              "battles": int(counts.get(anchor, 0))}]
    table += [{"model": p, "score": float(point[i]), "ci_low": float(lo[i]), "ci_high": float(hi[i]),
               "battles": int(counts.get(p, 0))} for p, i in index.items()]
    table = pd.DataFrame(table).sort_values("score", ascending=False).reset_index(drop=True)
    table.attrs["style"] = {name: float(g) for name, g in zip(kept, params[len(others):])}
    return table


# ---------------------------------------------------------------- style (Arena-Hard-Auto's style control)

STYLE_FEATURES = ("length", "headers", "lists", "bold")
_CODE_BLOCK = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_HEADER = re.compile(r"^#{1,6}\s", re.MULTILINE)
_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*+])\s", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")


def style_of(text: str) -> dict[str, int]:
    """An answer's style features: its length in characters and its markdown headers, list items and bold spans
    (outside code blocks, whose # and * are code)."""
    prose = _CODE_BLOCK.sub("", text)
    return {"length": len(text), "headers": len(_HEADER.findall(prose)), "lists": len(_LIST_ITEM.findall(prose)),
            "bold": len(_BOLD.findall(prose))}


def style_differences(a: str, b: str) -> dict[str, float]:
    """(f_a - f_b) / (f_a + f_b) per style feature (0 when neither has any): a 500- against a 520-token answer is
    nearly level, a 20- against a 40-token one is not (the normalisation of LMArena's style control)."""
    fa, fb = style_of(a), style_of(b)
    return {k: (fa[k] - fb[k]) / (fa[k] + fb[k]) if fa[k] + fb[k] else 0.0 for k in STYLE_FEATURES}


# ---------------------------------------------------------------- soft verdicts, agreement, panels

MATCH = {("A", "A"): 1.0, ("B", "B"): 1.0, ("tie", "tie"): 1.0, ("A", "tie"): 0.5, ("tie", "A"): 0.5,
         ("B", "tie"): 0.5, ("tie", "B"): 0.5, ("A", "B"): 0.0, ("B", "A"): 0.0}
"""How far two labels agree: the same label 1, a tie against a preference 1/2, opposite preferences 0 (the rule that
counts a tie as half a win)."""


def probabilities(row: dict) -> dict[str, float] | None:
    """P(A), P(B), P(tie) of a choice-mode judgment (a tie certain for identical answers, tied without a call);
    None where the judge gave no probabilities (generate mode, errors)."""
    if row.get("identical_answers"):
        return {"A": 0.0, "B": 0.0, "tie": 1.0}
    values = [row.get(k) for k in ("p_a", "p_b", "p_tie")]
    if row.get("verdict") == "error" or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return None
    return dict(zip(LABELS, (float(v) for v in values)))


def soft_score(row: dict, candidate_position: str) -> float | None:
    """What one judgment gives the candidate in probability, P(candidate's position) + P(tie)/2: AlpacaEval 2's
    weighted annotator, which reads the judge's probabilities instead of its most likely verdict."""
    p = probabilities(row)
    if p is None:
        return None
    return p[candidate_position] + 0.5 * p["tie"]


def expected_match(row: dict, label: str) -> float | None:
    """The judge's expected agreement with `label` (a position or tie) under its own probabilities: Σ P(v)·MATCH."""
    p = probabilities(row)
    return None if p is None else sum(p[v] * MATCH[v, label] for v in LABELS)


ROLE_LABEL = {"candidate": "A", "baseline": "B", "tie": "tie"}
"""An outcome for the pair's roles written as a label, to score it with MATCH (the candidate stands where A does)."""


def debiased_probabilities(rows_by_position: dict) -> dict[str, float] | None:
    """The judge's probabilities for the pair's roles with position taken out: for each of candidate, baseline and
    tie, the mean of its probability over the two orders ({"A": the judgment with the candidate in A, "B": with it in
    B}). None unless both orders have probabilities. A judge that gives position A 0.9 whatever it reads gives each
    answer (0.9 + 0.1)/2 = 0.5 here; what is left is what moved with the answers."""
    a, b = (probabilities(rows_by_position[p]) if rows_by_position.get(p) else None for p in ("A", "B"))
    if a is None or b is None:
        return None
    return {"candidate": (a["A"] + b["B"]) / 2, "baseline": (a["B"] + b["A"]) / 2, "tie": (a["tie"] + b["tie"]) / 2}


def debiased_preference(rows_by_position: dict) -> float | None:
    """The position-debiased preference for the candidate, P(candidate) + P(tie)/2 of debiased_probabilities: the
    mean of the two orders' soft_score for the same answer."""
    p = debiased_probabilities(rows_by_position)
    return None if p is None else p["candidate"] + 0.5 * p["tie"]


def most_likely(p: dict[str, float] | None) -> str:
    """The most likely outcome of role probabilities (candidate, baseline, tie); two exactly level: tie."""
    if p is None:
        return "error"
    ranked = sorted(p, key=lambda k: -p[k])
    return "tie" if math.isclose(p[ranked[0]], p[ranked[1]], abs_tol=1e-12) else ranked[0]


def cohen_kappa(labels_1, labels_2) -> float | None:
    """Cohen's κ of two raters over the same items (Cohen 1960): (p_o - p_e) / (1 - p_e), with p_o the share of items
    both label alike and p_e = Σ_c p_1(c)·p_2(c) from each rater's own label frequencies. 0: no agreement beyond
    what those frequencies give by chance; 1: perfect. None when p_e = 1 (both always give the one same label)."""
    pairs = [(a, b) for a, b in zip(labels_1, labels_2)]
    if not pairs:
        return None
    n = len(pairs)
    p_o = sum(a == b for a, b in pairs) / n
    first, second = {}, {}
    for a, b in pairs:
        first[a], second[b] = first.get(a, 0) + 1, second.get(b, 0) + 1
    p_e = sum(first[c] * second.get(c, 0) for c in first) / n ** 2
    return None if p_e > 1 - 1e-12 else (p_o - p_e) / (1 - p_e)


def grouped_bootstrap_ci(groups: list[list], statistic, seed: int = 0, n: int = 1000,
                         level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap of statistic(items) resampling whole groups (a pair's two orders stay together: the
    pair, not the judgment, was sampled). Resamples where the statistic is undefined (None) are left out; None when
    more than a tenth are, or there are fewer than two groups."""
    if len(groups) < 2:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        value = statistic([item for g in rng.integers(0, len(groups), len(groups)) for item in groups[g]])
        if value is not None:
            values.append(value)
    if len(values) < 0.9 * n:
        return None
    return [round(float(q), 4) for q in np.quantile(values, [(1 - level) / 2, (1 + level) / 2])]


def prefers_longer(chosen_lengths, other_lengths) -> float | None:
    """Share of choices that went to the longer answer, over choices between answers of different lengths
    (AlpacaEval's "proba. prefer longer"; 0.5 is no length bias)."""
    picks = [c > o for c, o in zip(chosen_lengths, other_lengths) if c != o]
    return mean([1.0 if p else 0.0 for p in picks])


PAIR_FIELDS = ("pair_id", "task", "set", "question", "answer_a", "answer_b", "candidate_chars", "baseline_chars",
               "human")
"""What every judge's row of one judgment says alike (the pair, not the verdict): a panel's combined row keeps them."""


def placed_judgments(entries, rows_by_key: dict, panel_combine: str | None = None) -> list[dict | None]:
    """A pair's judgments as a judge summary's judged_pairs lists them, [[candidate position, key], ...] (a panel's:
    [[position, [key of each judge]], ...]), from the verdict rows by key (newest per key): each a row with
    candidate_position and winner (the swap undone), a panel's combined by panel_judgment; None where not judged."""
    found = []
    for position, key in entries:
        if isinstance(key, list):
            members = [rows_by_key.get(k) for k in key]
            first = next((m for m in members if m), None)
            row = None if first is None else {
                **{k: first[k] for k in PAIR_FIELDS if k in first}, **panel_judgment(members, panel_combine or "mean"),
                "identical_answers": all(m and m.get("identical_answers") for m in members)}
        else:
            row = rows_by_key.get(key)
        found.append({**row, "candidate_position": position, "winner": unswap(row["verdict"], position)}
                     if row else None)
    return found


def panel_judgment(rows: list, combine: str) -> dict:
    """One judgment of a judge panel from its members' judgments of the same prompt in the same positions.
    mean: the mean of the members' P(A), P(B), P(tie), and its most likely label (two level: tie); without
    probabilities (generate mode) it is a vote. majority: the label more than half the members gave, else tie.
    Members without an answer (an error row, not judged yet) are left out and counted in `members`; none: error."""
    answered = [r for r in rows if r and r.get("verdict") in LABELS]
    if not answered:
        return {"verdict": "error", "members": 0}
    probs = [probabilities(r) for r in answered]
    if combine == "mean" and None not in probs:
        p = {c: sum(q[c] for q in probs) / len(probs) for c in LABELS}
        ranked = sorted(LABELS, key=lambda c: -p[c])
        verdict = "tie" if math.isclose(p[ranked[0]], p[ranked[1]], abs_tol=1e-12) else ranked[0]
        return {"verdict": verdict, "p_a": p["A"], "p_b": p["B"], "p_tie": p["tie"], "members": len(answered)}
    votes = [r["verdict"] for r in answered]
    top = max(LABELS, key=votes.count)
    return {"verdict": top if votes.count(top) > len(votes) / 2 else "tie", "members": len(answered)}


# ---------------------------------------------------------------- how many prompts (power)

ALPHA, POWER = 0.05, 0.8


def _z_sum(alpha: float, power: float) -> float:
    return NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)


def detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest true difference a two-sided z-test on n paired prompts detects with this power:
    (z_{1-α/2} + z_{power}) · sd / √n (2.80 · sd / √n at α = 0.05 and 80% power)."""
    return None if n < 1 else _z_sum(alpha, power) * sd / math.sqrt(n)


def prompts_needed(sd: float, difference: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Prompts needed to detect `difference` with this power: ⌈((z_{1-α/2} + z_{power}) · sd / difference)²⌉;
    None for no difference (nothing to detect)."""
    if not difference:
        return None
    return max(2, math.ceil((_z_sum(alpha, power) * sd / abs(difference)) ** 2))


def power_plan(values, null: float = 0.5, worst_sd: float = 0.5, alpha: float = ALPHA, power: float = POWER) -> dict:
    """The power calculation for one mean of per-prompt values against `null`: a run's per-prompt scores against
    1/2 (is it better than SFT?), or the per-prompt differences of two runs on the same prompts against 0 (paired
    design). The spread is the measured one; with fewer than two prompts or none (every prompt scored alike) it is
    the largest the values can have (`worst_sd`: 1/2 for scores in [0, 1], 1 for differences), and says so."""
    values = np.asarray([v for v in values if v is not None], dtype=float)
    n = int(values.size)
    sd = float(values.std(ddof=1)) if n >= 2 else 0.0
    source = "measured"
    if sd == 0.0:
        sd, source = worst_sd, ("worst case: fewer than two prompts" if n < 2 else
                                "worst case: every prompt scored alike, no spread to plan from")
    effect = float(values.mean()) - null if n else None
    return {"n": n, "effect": effect, "sd": round(sd, 4), "sd_source": source, "alpha": alpha, "power": power,
            "detectable": detectable_difference(sd, n, alpha, power) if n else None,
            "needed": prompts_needed(sd, effect, alpha, power) if effect else None}


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
