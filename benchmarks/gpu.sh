#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one command, sized for under 8 minutes on one H100 / H200:
#   1. the built-in GPT at the paper's setting (6M model, batch 256 x 256, replay 64 rows, buffer 16):
#      ms/step of plain / KL on real replay / KL on self-generated replay, and the sampler's tokens/s
#   2. `selfreplay demo --full` (the paper's toy: d_model 256, batch 2048) steps/s, 100 steps per task
#   3. a Llama-3.2-1B-shaped Hugging Face model with random weights: plain / KL real / KL self step, peak memory
# Results go to ${OUT:-bench_gpu}/ (JSON per part, demo outputs) and a summary on stdout.
#   bash benchmarks/gpu.sh               # on the GPU machine
#   bash benchmarks/gpu.sh --cpu-smoke   # the same commands at toy sizes on a CPU (checks the script, ~2 min)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "${1:-}" = "--cpu-smoke" ]; then
    GPT=(device=cpu model.d_model=32 model.n_layers=1 model.head_dim=16 model.context=32 model.vocab_size=256
         data.batch_size=8 replay.batch_size=4 replay.buffer=2)
    STEPS=(--steps 2 --warmup 1)
    DEMO=(--device cpu --steps-per-task 4 --eval-every 4)
    HF=(--model llama-tiny device=cpu data.batch_size=4 data.seq_len=64 replay.batch_size=2 replay.buffer=1)
else
    GPT=()                      # the paper's setting is the GPU default of `selfreplay bench`
    STEPS=(--steps 30 --warmup 10)
    DEMO=(--full --steps-per-task 100 --eval-every 100)
    HF=(--model llama-1b data.batch_size=16 data.seq_len=512 replay.batch_size=4 replay.buffer=4
        gradient_checkpointing=true)
fi
python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

echo "== 1. built-in GPT, paper setting"
time selfreplay bench "${GPT[@]}" --methods plain,kl_real,kl_self,sampling "${STEPS[@]}" --json "$OUT/gpt.json"

echo "== 2. demo --full, steps/s"
time selfreplay demo "${DEMO[@]}" --out "$OUT/demo" | tail -4

echo "== 3. Llama-1B shape (random weights), Hugging Face path"
time selfreplay bench "${HF[@]}" --methods plain,kl_real,kl_self "${STEPS[@]:0:2}" --warmup 3 \
    --json "$OUT/llama.json"
echo "results in $OUT/"
