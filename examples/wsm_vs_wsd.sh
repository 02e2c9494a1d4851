#!/usr/bin/env bash
# WSM vs WSD end to end on the embedded corpus (issue 9):
#   (a) WSD: warmup, stable, then a 1-sqrt decay of the LR over the last DECAY_FRAC of training;
#   (b) WSM: the same run at a stable LR to the end, saving a model-only window checkpoint every
#       WSM_INTERVAL iterations over the last WINDOW_ITERS, then merged offline with the 1-sqrt,
#       mean and EMA coefficients.
# Both runs see the same data in the same order (same seed) and the same number of tokens. Every
# checkpoint (stable last iterate, decayed, each merge) is evaluated on the held-out split with
# tools/evaluate.py; one table is printed (and written to $OUT/table.md) and the loss curves with
# the merge window go to $OUT/wsm_vs_wsd.png. EXPORT=1 also exports each of them to Hugging Face
# (tools/export_hf.py, to $OUT/hf/NAME) and scores it with lm-evaluation-harness on the held-out
# tasks (tools/eval_harness.py, to $OUT/harness/NAME.json): extra columns of the table. It needs
# `pip install -e .[hf]`; on an existing OUT it only adds the exports and scores.
#
# Finds the package's environment itself (examples/use_env.sh: the active one when it has
# torchrun and megatron-core, else the README's .venv); it installs nothing. CPU by default
# (2 gloo processes, EP=2); the trainer uses the GPU by itself when there is one (set NPROC to
# the number of GPUs to use, EP to match).
#
# Resumable: a stage whose output (result JSON / merged dir) exists is skipped, so a second run only
# reprints the table; an interrupted training stage is restarted from scratch. Shortened run for
# CI: ITERS=20 WSM_INTERVAL=2 EVAL_ITERS=2 OUT=/tmp/x bash examples/wsm_vs_wsd.sh
#
# Default settings (PRESET=tiny): 8 min measured on 2 shared CPU cores, no GPU (docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
. examples/use_env.sh

# ---- presets (PRESET=tiny | cpu-medium | gpu); every setting below still overrides them ----
#   tiny        the default: 0.95 M parameters on the embedded docs corpus, 8 min on 2 CPU cores
#   cpu-medium  7.6 M parameters (4 layers, 8 experts), the env-python corpus at a 16 K
#               vocabulary (61 M training tokens, built once in ~4 min), 1000 iterations of
#               4 K tokens: 4.1 M tokens, well under one epoch; ~1.75 s/iteration on 2 cores,
#               so ~35 min for the stable run with its evaluations and readouts, + ~8 min
#               for the WSD run (a branch of the stable run at iteration 800); resumable
#               inside a training (full checkpoints every 100 iterations)
#   gpu         384 M parameters, ~117 M active per token (12 layers, hidden 768, 8 experts
#               top-2), bf16, TE when present, 1 GPU, 900 iterations of 64 K tokens = 59 M
#               tokens: one pass over env-python (not run yet: no GPU in the sessions so far)
PRESET=${PRESET:-tiny}
case "$PRESET" in
    tiny)
        P_OUT=runs/wsm_vs_wsd P_ITERS=800 P_LR=6e-3 P_EVAL_ITERS=16 P_NPROC=2 P_EP=2
        P_SAVE_INTERVAL=0 P_DATA_ARGS="" P_TITLE="tiny MoE on the embedded corpus"
        P_MODEL_ARGS="--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-experts 4 \
--moe-router-topk 2 --seq-length 128 --micro-batch-size 4 --global-batch-size 8" ;;
    cpu-medium)
        P_OUT=runs/wsm_vs_wsd_cpu_medium P_ITERS=1000 P_LR=3e-3 P_EVAL_ITERS=32 P_NPROC=2 P_EP=2
        P_SAVE_INTERVAL=100 P_DATA_ARGS="--data-source env-python --vocab-size 16384"
        P_TITLE="cpu-medium: 7.6 M-parameter MoE on env-python"
        P_MODEL_ARGS="--num-layers 4 --hidden-size 128 --num-attention-heads 4 --num-experts 8 \
--moe-router-topk 2 --moe-ffn-hidden-size 256 --seq-length 256 --micro-batch-size 4 \
--global-batch-size 16" ;;
    gpu)
        P_OUT=runs/wsm_vs_wsd_gpu P_ITERS=900 P_LR=1e-3 P_EVAL_ITERS=32 P_NPROC=1 P_EP=1
        P_SAVE_INTERVAL=360 P_DATA_ARGS="--data-source env-python --vocab-size 16384"
        P_TITLE="gpu: 384 M-parameter MoE on env-python"
        P_MODEL_ARGS="--num-layers 12 --hidden-size 768 --num-attention-heads 12 \
--num-query-groups 4 --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 1536 \
--seq-length 1024 --micro-batch-size 8 --global-batch-size 64 --bf16" ;;
    *) echo "PRESET=$PRESET: use tiny, cpu-medium or gpu" >&2; exit 2 ;;
esac

# ---- settings (override from the environment) ----
OUT=${OUT:-$P_OUT}
ITERS=${ITERS:-$P_ITERS}                 # training iterations of each run (equal tokens)
DECAY_FRAC_PCT=${DECAY_FRAC_PCT:-20}     # WSD decays over the last 20 % of ITERS
DECAY_ITERS=${DECAY_ITERS:-$((ITERS * DECAY_FRAC_PCT / 100))}
WINDOW_ITERS=${WINDOW_ITERS:-$DECAY_ITERS}  # merge duration = decay duration (the fair comparison)
WSM_INTERVAL=${WSM_INTERVAL:-10}         # window checkpoint every N iterations
KEEP_ITERS=${KEEP_ITERS:-$WINDOW_ITERS}  # window checkpoints kept (> WINDOW_ITERS: also merge
                                         # 1-sqrt over all of them, a longer window)
MIN_LR_RATIOS=${MIN_LR_RATIOS:-}         # e.g. "0.1 0.3": also 1-sqrt merges whose emulated
                                         # decay ends at that fraction of the LR, not at 0
EMA_ALPHA=${EMA_ALPHA:-0.2}              # weight of the newest checkpoint in the EMA merge
LR=${LR:-$P_LR}                          # high enough that decaying/merging visibly helps
MIN_LR=${MIN_LR:-0}                      # the decay goes to 0, as the 1-sqrt merge emulates
WARMUP=${WARMUP:-$((ITERS / 20))}
SEED=${SEED:-1234}
NPROC=${NPROC:-$P_NPROC}                 # training processes (EP x DP)
EP=${EP:-$P_EP}
MERGE_NPROC=${MERGE_NPROC:-1}            # merge processes: 1 is fastest for a 4 MB model; raise it for big ones
GRID=${GRID:-0}                          # 1: also the (interval, count) grid at duration WINDOW_ITERS
EXPORT=${EXPORT:-0}                      # 1: also HF export + lm-eval scores of every checkpoint
HARNESS_LIMIT=${HARNESS_LIMIT:-}         # lm-eval items per task (default: all of them)
EVAL_ITERS=${EVAL_ITERS:-$P_EVAL_ITERS}  # tiny: 16 x 8 x 128 tokens ~ the whole valid split
DATA_CACHE=${DATA_CACHE:-data_cache}
MODEL_ARGS=${MODEL_ARGS:-$P_MODEL_ARGS}
DATA_ARGS=${DATA_ARGS-$P_DATA_ARGS}      # where the tokens come from (recorded in checkpoints)
SAVE_INTERVAL=${SAVE_INTERVAL:-$P_SAVE_INTERVAL}  # >0: full checkpoints to resume a training from
# WSD as a branch of the stable run, as a WSD user decays a copy of a stable checkpoint: the two
# runs are the same until the decay starts, so the WSD run loads the stable run's full
# checkpoint at ITERS - DECAY_ITERS and trains only the decay (bit-identical to training it from
# scratch: tests/distributed/test_resume_schedule.py). auto: on when that checkpoint exists.
DECAY_START=$((ITERS - DECAY_ITERS))
WSD_BRANCH=${WSD_BRANCH:-auto}
if [ "$WSD_BRANCH" = auto ]; then
    WSD_BRANCH=0
    if [ "$SAVE_INTERVAL" -gt 0 ] && [ "$DECAY_START" -gt 0 ] \
        && [ $((DECAY_START % SAVE_INTERVAL)) = 0 ]; then WSD_BRANCH=1; fi
fi
DRY_RUN=${DRY_RUN:-0}                    # 1: print the training and merge commands, run nothing
LOG_INTERVAL=${LOG_INTERVAL:-10}
# Held-out curves: both runs evaluate every EVAL_INTERVAL iterations (a multiple of
# WSM_INTERVAL), and the stable run also reads out its merged window there
# (--wsm-eval-methods 1-sqrt: the merge built in memory, training unchanged).
EVAL_INTERVAL=${EVAL_INTERVAL:-$(( ITERS / 10 / WSM_INTERVAL * WSM_INTERVAL ))}
[ "$EVAL_INTERVAL" -gt 0 ] || EVAL_INTERVAL=$WSM_INTERVAL

export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
launch() {  # launch NPROC SCRIPT ARGS...: torchrun for >1 process, plain python for 1 (faster)
    local n=$1; shift
    if [ "$n" -gt 1 ]; then
        # --standalone: torchrun picks a free local port, so several runs can share a machine.
        torchrun --standalone --nproc-per-node "$n" "$@"
    else
        python "$@"
    fi
}

train() {  # train NAME EXTRA_FLAGS...: one run to $OUT/NAME, skipped when its result exists
    # FROM=CKPT train ...: a fresh start loads CKPT (weights, optimizer, data position) first.
    local name=$1; shift
    local dir="$OUT/$name"
    local save_every=$ITERS resume=() from=${FROM:-}
    [ "$SAVE_INTERVAL" -gt 0 ] && save_every=$SAVE_INTERVAL
    # shellcheck disable=SC2206
    local cmd=(pretrain_moe.py --expert-model-parallel-size "$EP" $MODEL_ARGS $DATA_ARGS
        --train-iters "$ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP"
        --seed "$SEED" --save "$dir/ckpt" --save-interval "$save_every"
        --tensorboard-dir "$dir/tb" --log-interval "$LOG_INTERVAL" --eval-interval 0
        --eval-iters "$EVAL_ITERS" --data-cache-dir "$DATA_CACHE" --no-progress-bar
        --output-json "$dir/result.tmp.json" "$@")
    if [ "$DRY_RUN" = 1 ]; then echo "train $name: ${cmd[*]}${from:+ --load $from}"; return; fi
    if [ -f "$dir/result.json" ]; then echo "== $name: done, reusing $dir"; return; fi
    if [ "$SAVE_INTERVAL" -gt 0 ] && [ -f "$dir/ckpt/latest_checkpointed_iteration.txt" ]; then
        # Go on from the newest complete full checkpoint (bit-exact: optimizer, RNG, data
        # position); result.json then holds the history of the resumed part only.
        resume=(--load "$dir/ckpt")
        echo "== train $name: resuming from iteration $(cat "$dir/ckpt/latest_checkpointed_iteration.txt")"
    else
        # A run killed before its first full checkpoint: start it again cleanly.
        rm -rf "$dir"; mkdir -p "$dir"
        if [ -n "$from" ]; then resume=(--load "$from"); fi
    fi
    echo "== train $name: $ITERS iterations $*"
    launch "$NPROC" "${cmd[@]}" "${resume[@]}" >> "$dir/train.log" 2>&1 \
        || { tail -n 40 "$dir/train.log"; exit 1; }
    mv "$dir/result.tmp.json" "$dir/result.json"   # last: its presence means the stage is done
}

merge() {  # merge NAME INPUT_AND_METHOD_FLAGS...: merge window checkpoints to $OUT/NAME
    local name=$1; shift
    if [ "$DRY_RUN" = 1 ]; then echo "merge $name: $*"; return; fi
    # The merge tool writes a temp dir and renames it: an existing dir is a finished merge.
    if [ -d "$OUT/$name" ]; then echo "== $name: done, reusing"; return; fi
    echo "== merge $name: $*"
    launch "$MERGE_NPROC" tools/merge_wsm.py "$@" --save "$OUT/$name" --no-progress-bar \
        > "$OUT/$name.merge.log" 2>&1 || { tail -n 40 "$OUT/$name.merge.log"; exit 1; }
}

evaluate() {  # evaluate NAME CKPT: held-out loss/ppl/violations to $OUT/eval/NAME.json
    local name=$1 ckpt=$2
    [ "$DRY_RUN" = 1 ] && return
    mkdir -p "$OUT/eval"
    if [ -f "$OUT/eval/$name.json" ]; then return; fi
    echo "== evaluate $name"
    python tools/evaluate.py --load "$ckpt" --eval-iters "$EVAL_ITERS" \
        --data-cache-dir "$DATA_CACHE" --no-progress-bar --output-json "$OUT/eval/$name.tmp.json" \
        > "$OUT/eval/$name.log" 2>&1 || { tail -n 40 "$OUT/eval/$name.log"; exit 1; }
    mv "$OUT/eval/$name.tmp.json" "$OUT/eval/$name.json"
}

score() {  # score NAME CKPT: HF export to $OUT/hf/NAME, lm-eval scores to $OUT/harness/NAME.json
    local name=$1 ckpt=$2
    [ "$EXPORT" = 1 ] && [ "$DRY_RUN" != 1 ] || return 0
    mkdir -p "$OUT/hf" "$OUT/harness"
    if [ -f "$OUT/harness/$name.json" ]; then return; fi
    echo "== export + harness $name"
    # The export appears atomically (temp dir, rename last): an existing dir is a finished one.
    if [ ! -d "$OUT/hf/$name" ]; then
        python tools/export_hf.py --load "$ckpt" --save "$OUT/hf/$name" \
            --data-cache-dir "$DATA_CACHE" > "$OUT/harness/$name.export.log" 2>&1 \
            || { tail -n 40 "$OUT/harness/$name.export.log"; exit 1; }
    fi
    python tools/eval_harness.py --model "$OUT/hf/$name" --data-cache-dir "$DATA_CACHE" \
        --tasks-dir "$OUT/harness/tasks" ${HARNESS_LIMIT:+--limit "$HARNESS_LIMIT"} \
        --output-json "$OUT/harness/$name.tmp.json" > "$OUT/harness/$name.log" 2>&1 \
        || { tail -n 40 "$OUT/harness/$name.log"; exit 1; }
    mv "$OUT/harness/$name.tmp.json" "$OUT/harness/$name.json"
}

start=$SECONDS
WSD_FLAGS=(--lr-decay-style WSD --lr-wsd-decay-style 1-sqrt --lr-wsd-decay-iters "$DECAY_ITERS"
    --eval-interval "$EVAL_INTERVAL")
[ "$WSD_BRANCH" = 1 ] || train wsd "${WSD_FLAGS[@]}"
train stable --lr-decay-style stable --wsm-interval "$WSM_INTERVAL" --wsm-window "$KEEP_ITERS" \
    --eval-interval "$EVAL_INTERVAL" --wsm-eval-methods 1-sqrt
if [ "$WSD_BRANCH" = 1 ]; then
    FROM="$OUT/stable/ckpt/$(printf 'iter_%07d' "$DECAY_START")" train wsd "${WSD_FLAGS[@]}"
fi

WINDOW=(--load-dir "$OUT/stable/ckpt/wsm_window" --window-iters "$WINDOW_ITERS")
merge merged_1sqrt "${WINDOW[@]}" --method 1-sqrt
merge merged_mean "${WINDOW[@]}" --method mean
merge merged_ema "${WINDOW[@]}" --method ema --alpha "$EMA_ALPHA"

evaluate stable "$OUT/stable/ckpt"
evaluate wsd "$OUT/wsd/ckpt"
evaluate merged_1sqrt "$OUT/merged_1sqrt"
evaluate merged_mean "$OUT/merged_mean"
evaluate merged_ema "$OUT/merged_ema"
score stable "$OUT/stable/ckpt"
score wsd "$OUT/wsd/ckpt"
score merged_1sqrt "$OUT/merged_1sqrt"
score merged_mean "$OUT/merged_mean"
score merged_ema "$OUT/merged_ema"

# The remedy space when 1-sqrt lags (docs/results.md): a longer window at the same interval,
# and an emulated decay that stops above 0 (--min-lr-ratio).
if [ "$KEEP_ITERS" -gt "$WINDOW_ITERS" ]; then
    merge "merged_1sqrt_w$KEEP_ITERS" --load-dir "$OUT/stable/ckpt/wsm_window" \
        --window-iters "$KEEP_ITERS" --method 1-sqrt
    evaluate "merged_1sqrt_w$KEEP_ITERS" "$OUT/merged_1sqrt_w$KEEP_ITERS"
fi
for ratio in $MIN_LR_RATIOS; do
    merge "merged_1sqrt_r$ratio" "${WINDOW[@]}" --method 1-sqrt --min-lr-ratio "$ratio"
    evaluate "merged_1sqrt_r$ratio" "$OUT/merged_1sqrt_r$ratio"
done

if [ "$GRID" = 1 ]; then
    # Merge granularity at a fixed duration (the slides' (interval, count) grid, scaled down):
    # N intervals of I = WINDOW_ITERS/N iterations ending at the newest checkpoint (N+1 inputs;
    # 1-sqrt gives the oldest weight 0), N = WINDOW_ITERS/WSM_INTERVAL halved down to 2, where
    # N divides the window into multiples of WSM_INTERVAL. (N = 1 would put all weight on the
    # newest input: the stable last iterate, already a row of the table.)
    N=$((WINDOW_ITERS / WSM_INTERVAL))
    while [ "$N" -ge 2 ]; do
        I=$((WINDOW_ITERS / N))
        if [ $((WINDOW_ITERS % N)) = 0 ] && [ $((I % WSM_INTERVAL)) = 0 ]; then
            inputs=()
            for ((it = ITERS - WINDOW_ITERS; it <= ITERS; it += I)); do
                inputs+=("$OUT/stable/ckpt/wsm_window/$(printf 'iter_%07d' "$it")")
            done
            merge "grid_I${I}_N${N}" --inputs "${inputs[@]}" --method 1-sqrt
            evaluate "grid_I${I}_N${N}" "$OUT/grid_I${I}_N${N}"
            score "grid_I${I}_N${N}" "$OUT/grid_I${I}_N${N}"
        fi
        N=$((N / 2))
    done
fi

[ "$DRY_RUN" = 1 ] && exit 0
python examples/plot_wsm_vs_wsd.py --out "$OUT" --png "$OUT/wsm_vs_wsd.png" --table "$OUT/table.md" \
    --title "WSM vs WSD, $P_TITLE, seed $SEED (equal tokens)"
echo "(this invocation: $((SECONDS - start)) s; outputs in $OUT)"
