"""bench.cost_model's report, from a saved run: the fit, the paired per-user ratios, the identity count."""

from __future__ import annotations

import json

from bench.cost_model import CALL_SIZES, configs, fit, report


def _run(config: str, condition: str, round_: int, scale: float, fixed: float, titles=("A (1999)", "B (2001)")):
    requests = [{"user": u, "total_ms": scale * (1000 + 100 * u), "prefill_ms": 300.0, "search_ms": 600.0,
                 "decode_calls": 9, "decoded_tokens": 270, "titles": list(titles), "scores": [-1.0, -2.0]}
                for u in (1, 2, 3)]
    calls = {str(n): [fixed + 3.0 * n] * 2 for n in CALL_SIZES}
    return {"round": round_, "condition": condition, "config": config, "result": {"requests": requests, "calls": calls}}


def test_fit_recovers_a_line():
    fixed, per_token = fit({str(n): [12.0 + 2.5 * n, 12.0 + 2.5 * n] for n in CALL_SIZES})
    assert abs(fixed - 12.0) < 1e-9 and abs(per_token - 2.5) < 1e-9


def test_report_from_a_saved_run(tmp_path, capsys):
    cfgs = configs([3000], threads=2)
    scale = {"before": 1.0, "passive": 0.9, "spin 3000": 0.8, "1 thread": 1.2, "adaptive": 0.6}
    runs = [_run(c["name"], cond, r, scale[c["name"]] * (1.5 if cond == "hog" else 1.0), 10.0 if "spin" in c["name"] else 40.0)
            for r in range(2) for cond in ("idle", "hog") for c in cfgs]
    runs[-1]["result"]["requests"][0]["titles"] = ["C (2005)", "B (2001)"]  # one request that differs
    (tmp_path / "cost-model-x.json").write_text(json.dumps({"date": "2026-12-01 20:18", "users": [1, 2, 3],
                                                            "configs": cfgs, "runs": runs}))
    assert report(tmp_path / "cost-model-x") == 0
    text = (tmp_path / "cost-model-x.md").read_text()
    assert "3 users × 2 rounds" in text and "2026-12-01 20:18" in text
    assert "| adaptive / before | idle | 0.60× | 0.60–0.60× | 3/3 |" in text
    assert "| passive / before | hog | 0.90× |" in text
    compared = 4 * 3 * 2 * 2  # four configurations besides passive, 3 users, 2 conditions, 2 rounds
    assert f"{compared - 1}/{compared} request pairs" in text
    assert "| spin 3000 | idle | 10.0 | 3.00 |" in text and "| before | idle | 40.0 | 3.00 |" in text
    assert (tmp_path / "cost-model-x.png").stat().st_size > 0
