#!/usr/bin/env bash
# FSDP2 checks that need CUDA (CI and the development box have none). Run from the repo root on a
# GPU machine; exit status 0 = every check passed.
#
#   bash bench/fsdp_check.sh                 # logs under ${OUT:-/tmp/fsdp_check}
#   PYTHON=.venv/bin/python bash bench/fsdp_check.sh
#
# What it runs (tests/halos_core/test_fsdp.py):
#   1. `-m gpu`: test_fsdp_on_gpus, through `accelerate launch` with the worker's accelerate.yaml
#      (distributed_type FSDP, fsdp_version 2, FULL_STATE_DICT) on CUDA/nccl:
#        - FSDP with min(2, GPUs) ranks = 1 plain GPU process with gradient accumulation
#          (losses rel 1e-4, final weights atol 1e-4);
#        - optimizer.pt of the step-3 checkpoint and of final/ is complete (every trained parameter
#          with full-shape exp_avg/exp_avg_sq, plain CPU tensors; gathered from the CUDA shards with
#          cpu_offload) and resumes in 1 plain GPU process with the same optimizer digest;
#        - a bf16 FSDP round (MixedPrecisionPolicy, fp32 master weights) exports an fp32 model.
#      With ONE GPU, FSDP runs on a 1-rank mesh: this checks the CUDA code path (nccl + the
#      cuda:nccl,cpu:gloo backend accelerate picks for FULL_STATE_DICT, DCP full-state gathers and
#      set_optimizer_state_dict onto CUDA DTensors, bf16 policy), not the sharding itself; the
#      2-rank sharding and cross-resume claims are the CPU tests (step 2), which shard for real.
#      With 2+ GPUs it also checks real 2-rank sharding on nccl.
#   2. the CPU FSDP tests (gloo, 2 ranks) under this machine's torch/accelerate/transformers.
#
# The GPU image here has torch/accelerate/transformers/peft/safetensors/yaml but not pydantic:
# carry wheels in .whl/ (see /work/.library/device/README.md), e.g. on the development box
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 python-dotenv==1.2.4
# (versions: requirements.lock); this script installs .whl/*.whl into /tmp/site when present.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-/tmp/fsdp_check}
mkdir -p "$LOGS"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset ACCELERATE_USE_CPU ACCELERATE_USE_FSDP

nvidia-smi -L 2>&1 | tee "$LOGS/env.txt"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOGS/env.txt"
import torch, accelerate, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "GPUs", torch.cuda.device_count(),
      "| accelerate", accelerate.__version__, "| transformers", transformers.__version__)
PYEOF
if ! "$PY" -c "import pydantic, pydantic_settings, yaml, peft, safetensors, pytest" 2>>"$LOGS/env.txt"; then
  echo "missing Python packages (see the header of $0: carry wheels in .whl/)" | tee -a "$LOGS/env.txt"
  exit 3
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: nothing to check here (the CPU tests run in CI)"; exit 4
fi

status=0
echo "== 1. gpu: FSDP2 on CUDA" | tee "$LOGS/gpu.log"
timeout 420 "$PY" -m pytest -q -rA -p no:cacheprovider -m gpu tests/halos_core/test_fsdp.py --durations=0 2>&1 \
  | tee -a "$LOGS/gpu.log" || status=1
grep -q "1 passed" "$LOGS/gpu.log" || status=1
echo "== 2. cpu: FSDP2 over gloo, 2 ranks" | tee "$LOGS/cpu.log"
timeout 300 "$PY" -m pytest -q -rA -p no:cacheprovider -m "not gpu" tests/halos_core/test_fsdp.py --durations=0 2>&1 \
  | tee -a "$LOGS/cpu.log" || status=1
echo "fsdp_check: $([ $status = 0 ] && echo PASSED || echo FAILED) (logs in $LOGS)"
exit $status
