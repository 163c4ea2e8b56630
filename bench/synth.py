"""Synthetic cohort generator throughput: slices per second for both presets, one core.

Each preset simulates whole patients (T1 non-fat-sat, pre-contrast and every
post-contrast phase) on one process, so the rate is per core; the run over several
workers is reported too. Prints a table and writes JSON (bench/results/synth.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from data_prep.synthetic import cohort


def time_patients(preset: str, patients: int, seed: int, max_slices: int | None) -> dict:
    scanner_ids = cohort.assign_scanners(max(patients, 10), seed)[:patients]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        slices, pixels = 0, 0
        for i, scanner_index in enumerate(scanner_ids):
            task = cohort.PatientTask(tmp, i, seed, scanner_index, preset, "all",
                                      max_slices=max_slices)
            result = cohort.generate_patient(task)
            slices += result.slices_written
            pixels += sum(r["rows"] * r["columns"] * r["n_slices"] for r in result.rows)
        seconds = time.perf_counter() - start
    return {"preset": preset, "patients": patients, "workers": 1, "slices": slices,
            "seconds": round(seconds, 3), "slices_per_s": round(slices / seconds, 2),
            "slices_per_s_per_core": round(slices / seconds, 2),
            "mean_pixels_per_slice": int(pixels / max(slices, 1))}


def time_cohort(patients: int, seed: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        _, results = cohort.run_cohort(tmp, patients, seed, "small", "pre", workers)
        seconds = time.perf_counter() - start
    slices = sum(r.slices_written for r in results)
    return {"preset": "small (iap-synth demo, --phases pre)", "patients": patients,
            "workers": workers, "slices": slices, "seconds": round(seconds, 3),
            "slices_per_s": round(slices / seconds, 2),
            "slices_per_s_per_core": round(slices / seconds / workers, 2),
            "mean_pixels_per_slice": 0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small-patients", type=int, default=6)
    parser.add_argument("--full-patients", type=int, default=2)
    parser.add_argument("--full-max-slices", type=int, default=48,
                        help="slice positions per full-size patient (all its series)")
    parser.add_argument("--demo-patients", type=int, default=40)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/synth.json"))
    args = parser.parse_args(argv)

    results = [time_patients("small", args.small_patients, args.seed, None),
               time_patients("full", args.full_patients, args.seed, args.full_max_slices),
               time_cohort(args.demo_patients, args.seed, args.workers)]
    print(f"{'preset':<38} {'patients':>8} {'workers':>7} {'slices':>7} {'seconds':>8} "
          f"{'slices/s':>9} {'per core':>9}")
    for r in results:
        print(f"{r['preset']:<38} {r['patients']:>8} {r['workers']:>7} {r['slices']:>7} "
              f"{r['seconds']:>8.1f} {r['slices_per_s']:>9.1f} {r['slices_per_s_per_core']:>9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "synth", "machine": {"cpus": os.cpu_count(),
                                                "python": platform.python_version(),
                                                "load_average": os.getloadavg()},
              "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
