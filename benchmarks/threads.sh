#!/usr/bin/env bash
# Thread scaling of the plain training step (BENCHMARKS.md "Threads"): four built-in GPT shapes at 1 and 2 torch
# threads and at the default count (the thread rule), on an idle machine and with a shell busy-loop keeping one
# core busy. Needs `selfreplay` on PATH.
set -u
declare -A MODEL
MODEL[bench]=""
MODEL[en_es]="model.d_model=128 model.n_layers=2 model.head_dim=32 model.context=128 data.batch_size=32"
MODEL[frontier]="model.d_model=64 model.n_layers=2 model.head_dim=32 model.context=64 data.batch_size=32"
MODEL[capacity]="model.d_model=16 model.n_layers=1 model.head_dim=16 model.context=64 model.vocab_size=512 data.batch_size=64"
for load in idle busy; do
  if [ "$load" = busy ]; then (while :; do :; done) & BUSY=$!; fi
  for m in bench en_es frontier capacity; do
    for t in 1 2 default; do  # default: the thread rule (selfreplay.threads) decides
      steps=30; [ "$m" = bench ] && steps=3
      arg="threads=$t"; [ "$t" = default ] && arg=""
      # shellcheck disable=SC2086
      row=$(selfreplay bench --methods plain --steps $steps --warmup 2 $arg ${MODEL[$m]} 2>/dev/null | grep -E "^plain|params\) on" | tr "\n" " ")
      echo "$load $m threads=$t :: $row"
    done
  done
  if [ "$load" = busy ]; then kill "$BUSY"; fi
done
