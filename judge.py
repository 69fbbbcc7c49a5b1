"""Pairwise LLM judge of DPO answers against SFT answers, with win rates and confidence intervals.

    python judge.py --candidate DPO.jsonl --baseline SFT.jsonl --judge-model J --out VERDICTS.jsonl

Not implemented yet: issue #6 builds it. Running it says so and exits 2, so no stage can appear to have worked.
"""
import sys

if __name__ == "__main__":
    print("error: judge.py is not implemented yet (issue #6)", file=sys.stderr)
    sys.exit(2)
