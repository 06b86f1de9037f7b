#!/usr/bin/env bash
# One prepared run on a CUDA machine: build the CUDA RMSNorm kernel, run its tests, time it against
# the device's copy bandwidth, time the bf16 training step of the real config (with its MFU), and the
# splice at B=64; then print one table. Each part's full output is kept in $LOG_DIR.
#
#   bash benchmarks/gpu.sh                      # from the repository root; ~5 minutes on an H100/H200
#   PEAK_TFLOPS=989 LOG_DIR=/tmp/gpu bash benchmarks/gpu.sh
#
# PEAK_TFLOPS is the dense bf16 peak used for MFU (989 for H100/H200 SXM). Needs a CUDA build of
# torch, nvcc (CUDA_HOME) and ninja; transformers for the training-step peer.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG_DIR=${LOG_DIR:-${OUT:-/tmp}/minimind-v-gpu}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
mkdir -p "$LOG_DIR"
declare -a ROWS

row() { ROWS+=("$1|$2|$3"); }
step() {  # step NAME TIMEOUT_S COMMAND...: run, keep the log, say how it ended
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - t0)) s (log $LOG_DIR/$name.log)"
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1 | tee "$LOG_DIR/device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee -a "$LOG_DIR/device.txt"

# 1. build the kernels with CUDA (ops.load compiles kernels/rmsnorm.cu when CUDA and nvcc are present)
if step build 400 python -c "
import time, torch; t = time.time()
from minimind_v import kernel_build; d = kernel_build.load(verbose=True)
import minimind_v.ops as ops
x = torch.randn(4, 512, device='cuda'); w = torch.rand(512, device='cuda')
ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
print('built in', round(time.time() - t), 's at', d, 'max diff', (ops.fused_rms_norm(x, w, 1e-5) - ref).abs().max().item())"; then
    row "CUDA kernel build" "$(grep -o 'built in.*' "$LOG_DIR/build.log")" ok
else
    row "CUDA kernel build" "failed: $(tail -1 "$LOG_DIR/build.log")" FAIL
fi

# 2. the CUDA tests (they skip without CUDA; here they must run)
step tests 400 python -m pytest tests/test_fused_rmsnorm.py tests/test_vlm.py -q -rs -p no:randomly
tests_rc=$?
row "CUDA tests (test_fused_rmsnorm, test_vlm)" "$(tail -1 "$LOG_DIR/tests.log")" "$([ $tests_rc -eq 0 ] && echo ok || echo FAIL)"

# 3. the RMSNorm kernel against a device-to-device copy of the same bytes (the floor)
step rmsnorm 300 python benchmarks/bench_rmsnorm.py --device cuda --shapes 5120x512,16384x4096 --repeats 50
while read -r line; do
    row "RMSNorm $(echo "$line" | awk '{print $1, $2, $3}')" \
        "fused $(echo "$line" | awk '{print $7}') ms, floor $(echo "$line" | awk '{print $8}') ms, eager/fused $(echo "$line" | awk '{print $10}')x" \
        "fused/floor $(echo "$line" | awk '{print $12}')"
done < <(grep -E '^ +[0-9]+x[0-9]+ ' "$LOG_DIR/rmsnorm.log")

# 4. the bf16 training step of the real config, ours vs transformers, with MFU
step lm_train 500 python benchmarks/bench_lm_train.py --device cuda --dtypes bf16 --steps 10 --repeats 5 \
    --batch 16 --seq 640 --contestants ours/manual,ours/fast,ours/sdpa,hf/sdpa --peak-tflops "$PEAK_TFLOPS"
while read -r line; do
    row "LM train step bf16 B=16 T=640: $(echo "$line" | awk '{print $1}')" \
        "$(echo "$line" | awk '{print $2}') s/step, $(echo "$line" | awk '{print $3}') tok/s, $(echo "$line" | awk '{print $4}') vs hf/sdpa" \
        "$(echo "$line" | grep -o 'MFU [0-9.]*%')"
done < <(grep -E '^(ours|hf)/' "$LOG_DIR/lm_train.log")

# 5. the splice at B=64 (vectorized splice vs the loop and upstream's function; no CUDA fused kernel)
step splice 300 python benchmarks/bench_splice.py --device cuda --batch 64 --repeat 21
while read -r line; do
    row "splice B=64, $(echo "$line" | awk '{print $2}') image(s)/row" \
        "copy $(echo "$line" | awk '{print $3}') ms, splice $(echo "$line" | awk '{print $4}') ms, loop $(echo "$line" | awk '{print $6}') ms, upstream $(echo "$line" | awk '{print $7}') ms" \
        "see log"
done < <(grep -E '^ +64 ' "$LOG_DIR/splice.log")

echo
printf '%-52s | %-78s | %s\n' "what" "result" "status"
printf '%s\n' "$(printf '%.0s-' {1..150})"
for r in "${ROWS[@]}"; do
    IFS='|' read -r a b c <<<"$r"
    printf '%-52s | %-78s | %s\n' "$a" "$b" "$c"
done
