"""Planner wall time and candidates per second for the planner issue's acceptance cases.

Each case runs `codesign plan --json` in a fresh process: once with an empty compile cache (cold),
then `--warm` more times with the cache filled (median reported). Results go to results.json.

    python experiments/planner_benchmark/run.py [--warm 3] [--cases 70b_h100,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "8b_v5p": ["--model", "llama3-8b", "--hardware", "tpu-v5p", "--devices", "64"],
    "70b_h100_cpu": ["--model", "llama3.1-70b", "--hardware", "h100", "--devices", "256", "--target", "cpu"],
    "70b_v5p_cpu": [
        "--model",
        "llama3.1-70b",
        "--hardware",
        "tpu-v5p",
        "--devices",
        "256",
        "--target",
        "cpu",
    ],
    "70b_v5p_tpu": [
        "--model",
        "llama3.1-70b",
        "--hardware",
        "tpu-v5p",
        "--devices",
        "256",
        "--target",
        "tpu",
    ],
    "v3_h800_cpu": ["--model", "deepseek-v3", "--hardware", "h800", "--devices", "2048", "--target", "cpu"],
}


def run_once(args: list[str], cache: str) -> dict:
    env = dict(os.environ, CODESIGN_CACHE_DIR=cache)
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "codesign", "plan", "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
        check=False,
    )
    wall = time.perf_counter() - t0
    if out.returncode not in (0, 1):
        return {"wall_s": wall, "error": out.stderr.strip().splitlines()[-1:]}
    doc = json.loads(out.stdout)
    best = doc["candidates"][doc["chosen"]] if doc["chosen"] is not None else None
    s = doc["search"]
    return {
        "wall_s": round(wall, 2),
        "search_wall_s": s["wall_s"],
        "scored": s["scored"],
        "compiled": s["compiled"],
        "cache_hits": s["cache_hits"],
        "candidates_per_s": round(s["scored"] / wall, 1),
        "best": best and best["strategy"]["spec"],
        "best_step_time_s": best and best["step_time_s"],
        "best_mfu": best and best["mfu"],
        "evidence": best and best["evidence"],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results.json"))
    a = ap.parse_args()
    results = {}
    for name in a.cases.split(","):
        with tempfile.TemporaryDirectory() as cache:
            cold = run_once(CASES[name], cache)
            warm = [run_once(CASES[name], cache)["wall_s"] for _ in range(a.warm)]
        results[name] = {
            "args": CASES[name],
            "cold": cold,
            "warm_wall_s": warm,
            "warm_median_s": statistics.median(warm) if warm else None,
        }
        print(name, json.dumps(results[name]), flush=True)
    with open(a.out, "w") as f:
        json.dump({"machine": f"{os.cpu_count()} cores", "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
