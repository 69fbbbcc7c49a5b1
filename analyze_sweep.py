"""Figures and tables from a finished or running sweep folder.

    python analyze_sweep.py --sweep logs/<sweep> [--out report/<sweep>]

Not implemented yet: issue #7 builds it. Running it says so and exits 2, so no stage can appear to have worked.
"""
import sys

if __name__ == "__main__":
    print("error: analyze_sweep.py is not implemented yet (issue #7)", file=sys.stderr)
    sys.exit(2)
