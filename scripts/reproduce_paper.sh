#!/usr/bin/env bash
# The paper's experiment on the 21 real tasks of ../shared/data (GSM8K, StrategyQA, 17 BIG-Bench-Hard tasks,
# 2 BIG-bench tasks): convert -> split train/test (no question in both) -> 21 task LoRAs + one multitask LoRA ->
# router -> `dlp-lora eval` of every system on every task and on composite-2/-3 prompts -> results/paper21/summary.json
# and the paper21 section of RESULTS.md.
#
#   scripts/reproduce_paper.sh                        # SmolLM2-135M-Instruct on this CPU (114 min measured, 2 cores)
#   MODEL=/path/to/Qwen2-1.5B scripts/reproduce_paper.sh --model /path/to/Qwen2-1.5B   # same experiment, other model
#
# Resumable: every stage is skipped when its output exists and LoRA training continues from its last checkpoint,
# so after an interruption the same command carries on. Run folder: $WORK (default /work/paper21, outside the
# repository: checkpoints and weights never land in git). Stage times: $WORK/stage_times.json.
# Environment: MODEL, WORK, SHARED_DATA (default ../shared/data from the repository), JOBS (LoRA trainings at once,
# default 2 on a CPU: one per core, each with one BLAS thread), STEPS/BATCH/MAX_LENGTH/LR (task LoRA budget),
# MT_STEPS (multitask LoRA; default: the task LoRAs' steps together, the fair budget), TEST_N/TRAIN_N (split),
# LIMIT/COMPOSITE_N/COMPOSITE_SCAFFOLD/EVAL_THREADS (evaluation), PY (the Python).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --model=*) MODEL="${1#--model=}"; shift ;;
    *) echo "error: reproduce_paper.sh: unknown argument $1 (only --model MODEL)" >&2; exit 2 ;;
  esac
done

MODEL="${MODEL:-default}"
WORK="${WORK:-/work/paper21}"
SHARED="${SHARED_DATA:-$REPO/../shared/data}"
PY="${PY:-$REPO/.venv/bin/python}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
# One BLAS thread per process: on a shared 2-core machine more threads spin against each other (measured 4-10x
# slower per training step); the two cores are used by two trainings at once instead (JOBS).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPU=1; JOBS="${JOBS:-1}"; EVAL_BATCH="${EVAL_BATCH:-64}"
else
  GPU=0; JOBS="${JOBS:-2}"; EVAL_BATCH="${EVAL_BATCH:-16}"
fi

# Task LoRA budget, chosen from measured step times on this CPU (docs/lora.md, "Budget of the reproduction").
STEPS="${STEPS:-40}" BATCH="${BATCH:-4}" MAX_LENGTH="${MAX_LENGTH:-320}" LR="${LR:-1e-3}" RANK="${RANK:-8}"
MT_STEPS="${MT_STEPS:-fair}"   # fair: STEPS x the number of tasks (set after the split)
# (nproc itself honours the OMP_NUM_THREADS=1 exported above, hence env -u)
EVAL_THREADS="${EVAL_THREADS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
TEST_N="${TEST_N:-50}" TRAIN_N="${TRAIN_N:-400}" LIMIT="${LIMIT:-50}" COMPOSITE_N="${COMPOSITE_N:-100}"
# 1: composite answers on forced labels (dlp-lora eval --composite-scaffold). The adapters of this run are trained
# on one bare answer then EOS, so under the free protocol they answer the first question and stop (measured: 98-100 %
# of their composite answers are one line), which scores the format, not the routing. 0: the free protocol.
COMPOSITE_SCAFFOLD="${COMPOSITE_SCAFFOLD:-1}"
if [ "$COMPOSITE_SCAFFOLD" = 1 ]; then SCAFFOLD_FLAG=--composite-scaffold; else SCAFFOLD_FLAG=; fi
SYSTEMS="base,single,dlp,dlp-sentence,dlp-segment,top1,multitask,uniform,oracle-segment"

DLP="nice -n 10 $PY -m dlp_lora"
RUN="$WORK/run"
TIMES="$WORK/stage_times.json"
mkdir -p "$WORK"
echo "reproduce_paper: model=$MODEL work=$WORK shared=$SHARED jobs=$JOBS gpu=$GPU steps=$STEPS batch=$BATCH" \
     "max_length=$MAX_LENGTH lr=$LR rank=$RANK mt_steps=$MT_STEPS composite_scaffold=$COMPOSITE_SCAFFOLD"

# stage NAME DONE_PATH CMD...: run CMD unless DONE_PATH exists; record its wall time in $TIMES.
stage() {
  local name="$1" done_path="$2"; shift 2
  if [ -e "$done_path" ]; then echo "== $name: done ($done_path exists)"; return 0; fi
  echo "== $name: $(date '+%F %T')"
  local t0; t0=$(date +%s)
  "$@"
  "$PY" - "$TIMES" "$name" "$(( $(date +%s) - t0 ))" <<'EOF'
import json, os, sys
path, name, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
times = json.load(open(path)) if os.path.exists(path) else {}
times[name] = times.get(name, 0.0) + secs   # a resumed stage adds its new time to the interrupted part
tmp = path + ".tmp"
json.dump(times, open(tmp, "w"), indent=2)
os.replace(tmp, path)
EOF
  echo "== $name: finished in $(( $(date +%s) - t0 )) s"
}

# 0. the default model, converted once into the user cache
MODEL_MARK="$WORK/.model_ready_$(echo "$MODEL" | tr -c 'A-Za-z0-9._-' '_')"
prepare_model() { if [ "$MODEL" = default ]; then $DLP models prepare; fi; touch "$MODEL_MARK"; }

# 1. the 21 tasks in the project's Q/A format (one converter call per raw file)
convert_tasks() {
  local tmp="$WORK/.tasks_all.tmp"
  rm -rf "$tmp"; mkdir -p "$tmp"
  $DLP data convert --format gsm8k "$SHARED/gsm8k/train.jsonl" "$tmp/gsm8k.json"
  $DLP data convert --format strategyqa "$SHARED/strategyqa/train.json" "$tmp/strategyqa.json"
  for f in "$SHARED"/bbh/*.json; do $DLP data convert --format bbh "$f" "$tmp/$(basename "$f")"; done
  for f in "$SHARED"/bigbench/*.jsonl; do
    local t; t=$(basename "$f" .jsonl)
    $DLP data convert --format bigbench "$f" "$tmp/$t.json"
  done
  mv "$tmp" "$WORK/tasks_all"
}

# 2. train/test split by distinct question (test written last: its presence means the split is complete)
split_tasks() {
  nice -n 10 "$PY" scripts/split_tasks.py "$WORK/tasks_all" "$WORK/train" "$WORK/test" --test-n "$TEST_N" \
    --train-n "$TRAIN_N" --min-train 40 --overwrite
}

LORA_ARGS="--model $MODEL --rank $RANK --batch-size $BATCH --max-length $MAX_LENGTH --lr $LR --save-steps 10 --no-progress --resume"

# 3. the 21 task LoRAs and the multitask LoRA, JOBS at a time (a queue: xargs -P), longest job first
train_loras() {
  local jobs="$WORK/.train_jobs.txt" mt_steps="$MT_STEPS"
  if [ "$mt_steps" = fair ]; then
    mt_steps=$(( STEPS * $(find "$WORK/train" -maxdepth 1 -name '*.json' ! -name '*.meta.json' | wc -l) ))
  fi
  {
    echo "$DLP train-lora $LORA_ARGS --max-steps $mt_steps --multitask --data-dir $WORK/train --out $RUN/multitask"
    for f in "$WORK"/train/*.json; do
      case "$f" in *.meta.json) continue ;; esac
      echo "$DLP train-lora $LORA_ARGS --max-steps $STEPS --data $f --out $RUN/adapters/$(basename "$f" .json)"
    done
  } > "$jobs"
  # each job logs to its own file; a failed job fails the stage (xargs exits non-zero), finished ones are kept
  mkdir -p "$WORK/logs"
  xargs -P "$JOBS" -I{} sh -c 'cmd="$1"; log="$2/logs/$(echo "$cmd" | sed "s|.*--out ||; s|.*/||").log";
      echo "start $(date +%T) $log"; $cmd > "$log" 2>&1 && echo "done  $(date +%T) $(tail -1 "$log")" ||
      { echo "FAILED: $log: $(tail -1 "$log")"; exit 255; }' _ {} "$WORK" < "$jobs"
  # every adapter is finished now: this only checks them and writes adapters.txt (the router's label order)
  $DLP train-lora $LORA_ARGS --max-steps "$STEPS" --data-dir "$WORK/train" --out "$RUN"
}

# 4. the router (mini-MLP) on the run's training questions
train_router() {
  [ -d "$RUN/router_data" ] || $DLP make-router-data --adapters "$RUN" --out "$RUN/router_data"
  $DLP train-router --data "$RUN/router_data" --model "$MODEL" --out "$RUN/router" --adapters "$RUN"
}

# 5. every system on every task's test questions and on composite-2/-3 prompts, one process, same samples
# (one process using every core: generation is not split across processes; --resume carries on after an
# interruption from the batches already finished)
evaluate() {
  env OMP_NUM_THREADS="$EVAL_THREADS" MKL_NUM_THREADS="$EVAL_THREADS" \
    $DLP eval --run "$RUN" --data-dir "$WORK/test" --systems "$SYSTEMS" --limit "$LIMIT" --composite 2,3 \
    --composite-n "$COMPOSITE_N" $SCAFFOLD_FLAG --batch-size "$EVAL_BATCH" --out "$WORK/eval" --overwrite --resume --no-progress
}

# 6. results/paper21/summary.json and the paper21 section of RESULTS.md (small, committed)
report() {
  nice -n 10 "$PY" scripts/reproduce_paper_report.py --work "$WORK" --out results/paper21 --results-md RESULTS.md
}

stage model "$MODEL_MARK" prepare_model
stage convert "$WORK/tasks_all" convert_tasks
stage split "$WORK/test" split_tasks
stage train_loras "$RUN/adapters.txt" train_loras
stage router "$RUN/router" train_router
stage eval "$WORK/eval/summary.json" evaluate
report
echo "reproduce_paper: finished $(date '+%F %T'); times in $TIMES"
