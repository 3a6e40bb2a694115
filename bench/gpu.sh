#!/usr/bin/env bash
# Every GPU benchmark of issue 7 and the GPU recipe, on one CUDA machine, in one go; one table at the end.
#
#   bash bench/gpu.sh                # from the repo root; the device-tool command is in bench/NOTES.md
#
# Stages (each under its own timeout, so the table always prints; with the default RECIPE_TIME the timeouts add up to 9.5 minutes,
# inside the device tool's 10-minute command limit; the expected total is about 5 minutes):
#   store       build the 2048-run digits_mlp store on the GPU (what the recipe and benchmarks read)
#   build_*     bench/build_dataset.py, vectorized vs one run at a time, digits_mlp and fashion_mlp
#   throughput  bench/train_throughput.py, preset L: fp32 eager vs bf16 vs bf16+compile, MFU
#   pipeline    bench/data_pipeline.py, loader pairs/s (memory-mapped and GPU-resident) vs a training step
#   recipe      gpt-params train --config configs/digits_mlp_gpu.yaml (RECIPE_TIME, default 2 of its 5 min)
#   sampling    bench/sampling.py on the recipe's checkpoint: DDPM-1000 vs DDIM/DPM++, networks/s
#   large       bench/large_target.py --projection grouped: a 2.1M-parameter target through tokenizer and DiT-S
#   memory      bench/store_memory.py with a 1 GB store (peak resident memory of the reader)
# Environment: STAGES (space-separated subset, default all), RECIPE_TIME (DD:HH:MM:SS), RECIPE_STEPS.
# Without a .whl/ folder the packages must already be importable; Fashion-MNIST comes from
# data/fashion-mnist/ (carried) when the machine lacks /usr/share/datasets/fashion-mnist/.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
STAGES=${STAGES:-"store build_digits build_fashion throughput pipeline recipe sampling large memory"}
RECIPE_TIME=${RECIPE_TIME:-"00:00:02:00"}
RECIPE_STEPS=${RECIPE_STEPS:-4000}
LOGS=${LOGS:-/tmp/gpu_bench}
STORE=data/digits_mlp_gpu
PY=python3
mkdir -p "$LOGS"

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
FASHION=/usr/share/datasets/fashion-mnist
if [ ! -f $FASHION/train-images-idx3-ubyte.gz ] && [ -d data/fashion-mnist ]; then
    mkdir -p $FASHION && cp data/fashion-mnist/*.gz $FASHION/ || echo "could not copy Fashion-MNIST to $FASHION"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
$PY -c "import torch, pytorch_lightning as pl, diffusers; print('torch', torch.__version__, '| lightning', pl.__version__, '| diffusers', diffusers.__version__, '| cuda', torch.cuda.is_available())"

ROWS=()
stage() {   # stage NAME TIMEOUT_S LINES COMMAND...: run, log, keep the last LINES lines for the table
    local name=$1 limit=$2 lines=$3; shift 3
    [[ " $STAGES " == *" $name "* ]] || return 0
    echo; echo "=== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    grep -v -i "warning" "$LOGS/$name.log" | tail -n 40
    local result
    result=$(grep -v -i "warn" "$LOGS/$name.log" | grep -v '^\s*$' | tail -n "$lines" | tr '\n' ';' | sed 's/;$//')
    [ $rc -eq 124 ] && result="TIMED OUT after ${limit}s; $result"
    ROWS+=("$(printf '%-13s %4ss rc=%-3s %s' "$name" $((SECONDS - t0)) "$rc" "$result")")
}

stage store 75 1 $PY -m gpt_params build-dataset --task digits_mlp --runs 2048 --epochs 20 --group-size 1024 \
    --out $STORE --device cuda --no-progress
stage build_digits 40 2 $PY bench/build_dataset.py --device cuda --task digits_mlp --runs 1024 --loop-runs 4
stage build_fashion 45 2 $PY bench/build_dataset.py --device cuda --task fashion_mlp --runs 1024 --epochs 2 --loop-runs 2
stage throughput 100 5 $PY bench/train_throughput.py --device cuda --size L --batch-size 256 --steps 20 --warmup 3 \
    --store $STORE
stage pipeline 40 5 $PY bench/data_pipeline.py --device cuda --size B --store $STORE
stage recipe $(( $(echo "$RECIPE_TIME" | awk -F: '{print $1*86400+$2*3600+$3*60+$4}') + 40 )) 1 \
    $PY -m gpt_params train --config configs/digits_mlp_gpu.yaml --trainer.max_time "$RECIPE_TIME" \
    --trainer.max_steps "$RECIPE_STEPS" --trainer.enable_progress_bar false --data.root $STORE
CKPT=$(ls -t runs/digits_mlp_gpu/lightning_logs/version_*/checkpoints/last.ckpt 2>/dev/null | head -n 1)
[ -n "$CKPT" ] && ROWS+=("$(printf '%-13s %s' recipe_steps \
    "$($PY -c "import torch; print('global_step', torch.load('$CKPT', map_location='cpu', weights_only=True)['global_step'])")")")
if [ -n "$CKPT" ]; then
    stage sampling 60 6 $PY bench/sampling.py --device cuda --ckpt "$CKPT" --runs 32
elif [[ " $STAGES " == *" sampling "* ]]; then
    ROWS+=("sampling      skipped: the recipe left no last.ckpt")
fi
stage large 25 3 $PY bench/large_target.py --device cuda --projection grouped   # the gather reference is a CPU story
stage memory 25 1 $PY bench/store_memory.py --gb 1

echo; echo "================================ gpu.sh summary ================================"
printf '%s\n' "${ROWS[@]}" | tee "$LOGS/summary.txt"
if [ -n "${OUT:-}" ]; then   # the device tool brings back files under $OUT: the summary and all logs in one
    { cat "$LOGS/summary.txt"; for f in "$LOGS"/*.log; do echo; echo "##### $f"; cat "$f"; done; } > "$OUT/gpu_bench.txt"
fi
