"""Generate answers with vLLM or HF from the SFT model and every DPO checkpoint.

    python generate.py --model M --prompts P --out OUT.jsonl [--engine vllm|hf]

Not implemented yet: issue #5 builds it. Running it says so and exits 2, so no stage can appear to have worked.
"""
import sys

if __name__ == "__main__":
    print("error: generate.py is not implemented yet (issue #5)", file=sys.stderr)
    sys.exit(2)
