#!/usr/bin/env bash
# The released 8B shape on one GPU (issue #17 item 3, docs/performance.md "The released 8B shape"): random
# bf16 weights built on the GPU, the real-shaped request (test.jpg 853x1280 + the demo prompt: 3657 tokens).
#
#   bash benchmarks/gpu_8b.sh [--reduced] [--out DIR] [PART ...]
#
# Parts (default: all, in this order; each prints its table and writes DIR/PART.json and DIR/PART.log):
#   env        GPU name and memory, torch / transformers / bitsandbytes / flash-attn versions
#   latency    every method (reference loop, exact, prefix, dual, threshold, prompt once, fast preset, fast +
#              prompt once) at batch 1, official demo settings (128 new tokens, 128 steps, block 32): latency,
#              peak GPU memory, answer tokens per second, the time split (vision, decoder, LM head, sampling)
#   batch      exact and fast at batch 1, 8, 32 (the request repeated): throughput; $BATCH_STEPS steps
#              (default 32: 4 tokens per step, so that batch 32 in exact mode fits a few minutes)
#   quant      exact and fast with the decoder's linears in 4-bit NF4 and in 8-bit LLM.int8 (bitsandbytes)
#   attention  exact and fast with eager attention and, where installed, flash_attention_2 (sdpa is `latency`)
#
# --reduced runs every part on the CPU at a tiny size (1 decoder and 1 vision layer, width 64, 8 new tokens in
# 4 steps, float32; the latency part without the image, as the reference loop's float64 logits over a 3.7k-token
# canvas and the full vocabulary need ~10 GB) and skips, with the reason printed, what needs CUDA: the script's
# own end-to-end check. Expected device time at full size (an estimate, not measured): latency 4-6 min, batch
# 3-5 min, quant 2-4 min, attention 2-3 min; one command may run at most 10 minutes, so run the parts apart.
set -euo pipefail
cd "$(dirname "$0")/.."

reduced=0
out=gpu_8b_results
parts=()
while (($#)); do
    case "$1" in
        --reduced) reduced=1 ;;
        --out) out="$2"; shift ;;
        env | latency | batch | quant | attention) parts+=("$1") ;;
        *) echo "gpu_8b.sh: unknown argument '$1' (parts: env latency batch quant attention; --reduced, --out DIR)" >&2
           exit 2 ;;
    esac
    shift
done
((${#parts[@]})) || parts=(env latency batch quant attention)
mkdir -p "$out"
python=${PYTHON:-python}

if ((reduced)); then
    device=(--device cpu --dtype float32 --threads "${THREADS:-2}")
    size=(--layers 1 --vision-layers 1 --hidden 64 --heads 2 --vision-hidden 32 --vision-heads 2 --skip-full-forward)
    official=(--steps 4 --gen-length 8 --block-length 4)
    batched=(--steps 2 --gen-length 8 --block-length 4)
    batch_sizes=1,2
    latency_extra=(--image none)
else
    device=(--device cuda --dtype bfloat16 --warmup)
    size=(--skip-full-forward)
    official=(--steps 128 --gen-length 128 --block-length 32)
    batched=(--steps "${BATCH_STEPS:-32}" --gen-length 128 --block-length 32)
    batch_sizes=1,8,32
    latency_extra=()
fi
bench=("$python" benchmarks/bench_generate.py --config released "${size[@]}" "${device[@]}")
has_cuda=$("$python" -c "import torch; print(int(torch.cuda.is_available()))")

run() {  # run NAME ARGS...: one benchmark invocation, its table on the terminal and in NAME.log, JSON in NAME.json
    local name=$1
    shift
    echo "== $name: ${bench[*]} $*"
    "${bench[@]}" "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.log"
}

skip() {  # skip NAME REASON
    echo "== $1: SKIPPED: $2" | tee "$out/$1.log"
}

for part in "${parts[@]}"; do
    case "$part" in
        env)
            {
                nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
                    || echo "no nvidia-smi: no GPU here"
                "$python" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("transformers", "bitsandbytes", "flash_attn"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "not installed")
EOF
            } 2>&1 | tee "$out/env.log"
            ;;
        latency)
            run latency "${official[@]}" "${latency_extra[@]}"
            ;;
        batch)
            run batch "${batched[@]}" --methods exact,fast --batch-sizes "$batch_sizes"
            ;;
        quant)
            if ((has_cuda)) && ! ((reduced)); then
                run quant_4bit "${official[@]}" --methods exact,fast --load-in-4bit
                run quant_8bit "${official[@]}" --methods exact,fast --load-in-8bit
            else
                skip quant "--load-in-4bit/--load-in-8bit need CUDA (bitsandbytes on the GPU; GPU memory is what is measured)"
            fi
            ;;
        attention)
            run attention_eager "${official[@]}" --methods exact,fast --attn-implementation eager
            if ((has_cuda)) && "$python" -c "import flash_attn" 2>/dev/null; then
                run attention_flash2 "${official[@]}" --methods exact,fast --attn-implementation flash_attention_2
            else
                skip attention_flash2 "flash_attention_2 needs CUDA and the flash-attn package (not importable here)"
            fi
            ;;
    esac
done
echo "== done: results in $out/"
