#!/usr/bin/env bash
# The CPU-scale English -> Spanish forgetting run: tokenizer, token files, English pretraining, Spanish
# finetuning (plain, KL on real English replay, KL on self-generated English replay), forgetting report.
# About 8 minutes on a 2-core CPU. Outputs: work_data/ (tokens) and runs/en_es_cpu/ (checkpoints, metrics).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data}
# Threads: a run alone takes what the thread rule picks for its work (every free core here); the two finetunes that
# run side by side take one core each.

[ -f work_data/tok4096.json ] || selfreplay tokenizer train "$DATA/en.txt.xz" "$DATA/es.txt.xz" \
    --out work_data/tok4096.json --vocab-size 4096 --max-lines 60000 --shuffle-seed 0
[ -d work_data/en ] || selfreplay tokenize "$DATA/en.txt.xz" --tokenizer work_data/tok4096.json --out work_data/en \
    --domain-token 0 --shuffle-seed 0 --max-tokens 9000000 --name en
[ -d work_data/es ] || selfreplay tokenize "$DATA/es.txt.xz" --tokenizer work_data/tok4096.json --out work_data/es \
    --domain-token 1 --shuffle-seed 0 --max-tokens 9000000 --name es

[ -f runs/en_es_cpu/pretrain_en/model.safetensors ] || selfreplay pretrain experiments/en_es_cpu/pretrain.yaml

finetune() {  # name, overrides...
    local name=$1; shift
    [ -f "runs/en_es_cpu/$name/model.safetensors" ] || \
        selfreplay finetune experiments/en_es_cpu/finetune.yaml "run_dir=runs/en_es_cpu/$name" "$@"
}
finetune ft_plain threads=1 &
plain=$!
finetune ft_kl_real replay.method=kl threads=1
wait "$plain"  # (a bare `wait` would not fail with it)
finetune ft_kl_self replay.method=kl replay.source=self

selfreplay eval runs/en_es_cpu/ft_plain runs/en_es_cpu/ft_kl_real runs/en_es_cpu/ft_kl_self \
    --corpus work_data/en --corpus work_data/es --json runs/en_es_cpu/eval.json
