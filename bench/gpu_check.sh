#!/usr/bin/env bash
# bash bench/gpu_check.sh [OUT_DIR]
# Every check that needs a GPU, in one script, for one short session on a single-GPU machine (H100/H200):
#   1. the gpu-marked tests (varlen / flash-attention packed loss = sdpa's block-diagonal loss),
#   2. bench/gpu_throughput.py (SmolLM3-3B architecture, 8k/16k/64k packed rows, varlen vs sdpa, liger, checkpointing),
#   3. the framework on the GPU: launch.py with the tiny model under distributed=zero3 (DeepSpeed on CUDA/NCCL),
#      distributed=fsdp (FSDP2) and single with varlen + liger, one rank each (one GPU: multi-GPU is not checked here).
# Wheels the machine lacks (liger-kernel, trl, datasets, hydra, deepspeed, ...) are installed from .whl/ when present
# (`pip download` them there first; see README "Performance"). Logs and tables go to OUT_DIR (default: gpu_out/).
set -uo pipefail
OUT_DIR=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
$PY - <<'EOF' 2>&1 | tee -a "$OUT_DIR/gpu.txt"
import importlib
for m in ("torch", "transformers", "trl", "datasets", "accelerate", "deepspeed", "liger_kernel", "flash_attn", "hydra"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "missing:", type(e).__name__, str(e)[:120])
EOF

echo "== 1. gpu tests"
timeout 180 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_packed_loss.py 2>&1 | tail -15 | tee "$OUT_DIR/gpu_tests.txt"

echo "== 2. gpu_throughput"
timeout "${BENCH_TIMEOUT:-360}" $PY bench/gpu_throughput.py --budget-s "${BENCH_BUDGET:-300}" ${BENCH_ARGS:-} 2>&1 \
  | grep -v "^\[transformers\]" | tee "$OUT_DIR/gpu_throughput.md"

echo "== 3. framework on the GPU"
COMMON=(model.dtype=bfloat16 train.bf16=true train.max_steps=20 train.logging_steps=10 distributed.processes_per_node=1
  cache_dir=/tmp/sft_cache)
run() {  # name, overrides...
  local name=$1; shift
  local t0=$SECONDS
  timeout "${RUN_TIMEOUT:-150}" $PY launch.py "${COMMON[@]}" "$@" hydra.run.dir=/tmp/gpu_runs/$name >"/tmp/gpu_runs_$name.log" 2>&1
  local rc=$?
  {
    echo "### $name: rc=$rc, $((SECONDS - t0)) s: python launch.py ${COMMON[*]} $*"
    if [ -f /tmp/gpu_runs/$name/metrics.json ]; then
      $PY -c "import json,sys; m=json.load(open(sys.argv[1])); print({k: m.get(k) for k in ('eval_loss_before','eval_loss_after','train_loss_last','train_tokens_per_second','trained_tokens','world_size')})" /tmp/gpu_runs/$name/metrics.json
    fi
    grep -E "'loss': |error|Error" "/tmp/gpu_runs_$name.log" | tail -6
  } 2>&1 | tee -a "$OUT_DIR/framework.txt"
}
mkdir -p /tmp/gpu_runs
run single_varlen_liger model.attn_implementation=varlen train.use_liger_kernel=true
run zero3 distributed=zero3 model.attn_implementation=varlen
run fsdp2 distributed=fsdp model.attn_implementation=varlen
for n in single_varlen_liger zero3 fsdp2; do tail -40 "/tmp/gpu_runs_$n.log"; done >"$OUT_DIR/framework_logs.txt"
echo "== done"
