"""bench/gpu_job.sh's CPU rehearsal: the GPU job's trial list, runner and export, end to end on a tiny model.

What the device run will execute is `bash bench/gpu_job.sh train`; `rehearse` runs the same search function
on the tests' tiny database and a tiny random LLaMA GGUF, so a typo in the trial list, the runner or the
export fails here and not on the GPU.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rehearse(tmp_path: Path, trials: Path | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "PYTHON": sys.executable,
    }
    if trials is not None:
        env["TRIALS"] = str(trials)
    return subprocess.run(
        ["bash", "bench/gpu_job.sh", "rehearse"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_rehearsal_runs_every_gpu_trial_and_exports_a_shippable_adapter(tmp_path):
    from safetensors.torch import load_file

    proc = _rehearse(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    listed = json.loads((REPO / "bench" / "gpu_trials.json").read_text())["trials"]
    rows = list(csv.DictReader(open(out / "trials.csv", encoding="utf-8")))
    assert [r["trial"] for r in rows] == [t["name"] for t in listed]
    assert all(r["status"] == "ok" for r in rows)
    lora = [(r["loss"], r["lr"], r["lora_r"]) for r in rows if r["full"] == "False"]
    assert sorted(lora) == [(loss, lr, "16") for loss in ("plain", "trie") for lr in ("0.001", "0.002")]
    assert [r["full"] for r in rows].count("True") == 1  # the reference point
    assert all(r["ship"] == ("False" if r["full"] == "True" else "True") for r in rows)
    # what comes back from the device: at most 8 files, 2 folders down, each well under 16 MiB
    returned = [p for p in out.rglob("*") if p.is_file()]
    assert {p.relative_to(out).as_posix() for p in returned} == {
        "trials.md", "trials.csv", "best/adapter_model.safetensors", "best/adapter_config.json",
        "best/genrec_run.json", "best/train_log.jsonl",
    }  # fmt: skip
    run = json.loads((out / "best" / "genrec_run.json").read_text())
    assert run["config"]["full"] is False and run["config"]["lora_r"] == 16
    assert run["config"]["valid_users"] == 0 and run["valid_users"] == 6  # all validation users
    assert (
        run["base_model"]["gguf_file"] == "model-F32.gguf" and "trained_on" in run
    )  # the GGUF, not its copy
    assert all(
        t.dtype.__str__() == "torch.bfloat16"
        for t in load_file(out / "best" / "adapter_model.safetensors").values()
    )
    assert "export" in proc.stdout and "| lora16-trie-lr2e-3 | ok |" in (out / "trials.md").read_text()


def test_a_typo_in_the_trial_list_fails_the_rehearsal(tmp_path):
    trials = tmp_path / "trials.json"
    trials.write_text(json.dumps({"common": {"epochs": 1}, "trials": [{"name": "typo", "lora_rank": 16}]}))
    proc = _rehearse(tmp_path, trials)
    assert proc.returncode != 0
    assert "rehearsal failed: typo: failed: UsageError: unknown training option(s): lora_rank" in proc.stderr
