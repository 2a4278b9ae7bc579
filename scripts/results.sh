#!/usr/bin/env bash
# Re-creates RESULTS.md: SmolLM2-135M-Instruct ("default") task LoRAs on the built-in suite and on real tasks from
# ../shared/data, a mini-MLP router per run, then `dlp-lora eval` (base / single / dlp / uniform), which writes
# TestOutputs/results_* and its own section of RESULTS.md. Sized for a shared 2-core CPU: short LoRA training
# (40 steps x batch 4), 40 test samples per task. Stages whose output exists are kept (re-runs resume);
# RESULTS_FRESH=1 starts from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
# one BLAS thread: on an oversubscribed CPU two spinning threads per process were 4x slower per training step
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
W=runs/results
SHARED="${SHARED_DATA:-../shared/data}"
DLP="nice -n 10 .venv/bin/dlp-lora"
PY="nice -n 10 .venv/bin/python"
TRAIN="--model default --max-steps 40 --batch-size 4 --lr 1e-3 --max-length 128 --save-steps 20 --resume"
[ "${RESULTS_FRESH:-0}" = 1 ] && rm -rf "$W"
mkdir -p "$W"

# ---- 1. built-in suite (8 generated tasks): 340 records each, split 300 train / 40 test, disjoint questions
[ -d $W/builtin_all ] || $DLP data builtin --out $W/builtin_all --n 340 --seed 0
[ -d $W/builtin_train ] || $PY scripts/split_tasks.py $W/builtin_all $W/builtin_train $W/builtin_test --test-n 40 --train-n 300
$DLP train-lora --data-dir $W/builtin_train --out $W/builtin_run $TRAIN
[ -d $W/builtin_run/router_data ] || $DLP make-router-data --adapters $W/builtin_run --out $W/builtin_run/router_data
[ -d $W/builtin_run/router ] || $DLP train-router --data $W/builtin_run/router_data --model default \
  --out $W/builtin_run/router --adapters $W/builtin_run

# evaluation: same samples for every system; the command writes its own section of RESULTS.md
$DLP eval --run $W/builtin_run --data-dir $W/builtin_test --limit 40 --batch-size 16 --out TestOutputs/results_builtin \
  --overwrite --results-md RESULTS.md --results-commands scripts/results.sh

# ---- 2. real tasks from ../shared/data (short inputs that fit the CPU): StrategyQA + 2 BIG-Bench-Hard tasks
if [ ! -d $W/real_all ]; then
  mkdir -p $W/real_all
  $DLP data convert --format strategyqa "$SHARED/strategyqa/train.json" $W/real_all/strategyqa.json
  for t in boolean_expressions sports_understanding; do
    $DLP data convert --format bbh "$SHARED/bbh/$t.json" $W/real_all/$t.json
  done
fi
[ -d $W/real_train ] || $PY scripts/split_tasks.py $W/real_all $W/real_train $W/real_test --test-n 40 --train-n 200
$DLP train-lora --data-dir $W/real_train --out $W/real_run $TRAIN
[ -d $W/real_run/router_data ] || $DLP make-router-data --adapters $W/real_run --out $W/real_run/router_data
[ -d $W/real_run/router ] || $DLP train-router --data $W/real_run/router_data --model default \
  --out $W/real_run/router --adapters $W/real_run

$DLP eval --run $W/real_run --data-dir $W/real_test --limit 40 --batch-size 16 --out TestOutputs/results_real \
  --overwrite --results-md RESULTS.md --results-commands scripts/results.sh

# the paper's Eq. 5 with every adapter kept (top-p 1.0): shows what the softmax over kept probabilities does
$DLP eval --run $W/real_run --data-dir $W/real_test --limit 40 --batch-size 16 --systems single,dlp,uniform \
  --top-p 1.0 --out TestOutputs/results_real_top_p1 --overwrite --results-md RESULTS.md --results-commands scripts/results.sh
