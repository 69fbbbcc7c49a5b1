#!/usr/bin/env bash
# The test tiers, timed: the host's CPU first (hosts of this kind differ: AVX-512 and bf16, or AVX2 only, where bf16
# is emulated and everything is slower), then pytest, then how long the tests took (setup and cluster not counted).
#   bash scripts/run_tests.sh fast    # make test-fast: no slow, cluster, vllm or multiprocess test
#   bash scripts/run_tests.sh all     # make test: every test (the local Slurm cluster must be up)
set -uo pipefail
cd "$(dirname "$0")/.."
tier=${1:-all}
shift || true
# Both tiers run two processes, a test module each at a time (pytest-xdist --dist loadfile): much of the suite waits
# on Slurm, process start-up or a single-threaded import while the other core is free, and a module's costly fixtures
# (the Slurm sweep, the local loop, the vLLM runs) stay in its process and are made once. The longest modules go first.
case "$tier" in
  fast) select=(-n 2 --dist loadfile -m "not slow and not cluster and not vllm and not multiprocess" tests) ;;
  all) first=(tests/test_sweep.py tests/test_reliability.py tests/test_pipeline.py tests/test_judge.py tests/test_scale_configs.py
              tests/test_train.py tests/test_generate.py)
       rest=($(ls tests/test_*.py | grep -v -x -F "$(printf '%s\n' "${first[@]}")"))
       select=(-n 2 --dist loadfile "${first[@]}" "${rest[@]}") ;;
  *) echo "run_tests.sh: unknown tier $tier (fast | all)" >&2; exit 2 ;;
esac
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
flags=$(grep -m1 '^flags' /proc/cpuinfo)
features=$(for f in avx2 avx512f avx512_bf16 amx_bf16; do [[ " $flags " == *" $f "* ]] && printf '%s ' "$f"; done)
echo "[tests] host: $cpu, $(nproc) cores, ${features:-no avx2}"
start=$(date +%s)
.venv/bin/python -m pytest "${select[@]}" "$@"
rc=$?
echo "[tests] $tier tier: $(( $(date +%s) - start )) s of test time on $cpu (${features% }), exit $rc"
exit $rc
