"""Issue 16 part 5: the concurrency scenarios of tests/test_concurrency.py, many rounds each.

Each round runs one scenario from scratch (its own repositories and `git daemon`) with its own
random start delays, then the scenario's checks (git fsck --full, theta-store fsck, every
committed version restored and compared by SHA-256, every process under a timeout). Prints per
scenario: rounds, failures (with the seed that reproduces each), and seconds per round (median,
90th percentile, max). The baseline beside it: the same scenario's steps run one after the other
(no overlap, --serial-rounds of them), so the ratio says what running at once costs or saves.

    python benches/bench_concurrency.py [--rounds 50] [--only two_adds,two_pushers] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_concurrency as tc  # the scenarios live with their tests


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="first round's seed (default: random)")
    ap.add_argument("--serial-rounds", type=int, default=3, help="rounds of the one-after-the-other baseline per scenario")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    names = [n for n in (args.only.split(",") if args.only else tc.SCENARIOS) if n]
    seed = args.seed or random.randrange(1 << 30)
    root = Path(tempfile.mkdtemp(prefix="theta-conc-bench-"))
    home = root / "home"
    os.environ.update(tc.setup_git(home))
    os.environ.update(
        GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@example.com", GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="b@example.com"
    )
    os.environ["GIT_CONFIG_NOSYSTEM"] = "1"
    tc.install(home)
    import theta_store

    print(f"theta_store from {Path(theta_store.__file__).parent}; first seed {seed}; {args.rounds} rounds per scenario")
    print(f"{'scenario':<20} {'rounds':>6} {'fail':>5} {'median s':>9} {'p90 s':>7} {'max s':>7} {'serial median s':>16} {'ratio':>6}")
    results = {}
    for name in names:
        fn = tc.SCENARIOS[name]
        times: list[float] = []
        failures: list[dict[str, object]] = []
        serial: list[float] = []
        for i in range(args.rounds):
            s = seed + i
            if i < args.serial_rounds:  # the baseline: the same steps, one after the other
                base = root / f"{name}-serial-{i}"
                base.mkdir()
                t0 = time.monotonic()
                try:
                    fn(base, random.Random(s), together=False)
                    serial.append(time.monotonic() - t0)
                except Exception as e:
                    print(f"  baseline round of {name} failed (seed {s}): {type(e).__name__}: {str(e)[:600]}", flush=True)
                shutil.rmtree(base, ignore_errors=True)
            base = root / f"{name}-{i}"
            base.mkdir()
            t0 = time.monotonic()
            try:
                fn(base, random.Random(s))
            except Exception as e:  # every failure is a finding: keep its seed and message
                failures.append({"seed": s, "error": f"{type(e).__name__}: {str(e)[:2000]}", "trace": traceback.format_exc()[-3000:]})
                print(f"  FAIL {name} seed {s}: {type(e).__name__}: {str(e)[:600]}", flush=True)
            else:
                shutil.rmtree(base, ignore_errors=True)
            times.append(time.monotonic() - t0)
        results[name] = {
            "rounds": args.rounds,
            "failures": len(failures),
            "median_s": statistics.median(times),
            "p90_s": quantile(times, 0.9),
            "max_s": max(times),
            "serial_median_s": statistics.median(serial) if serial else None,
            "failed": failures,
        }
        r = results[name]
        base_s = statistics.median(serial) if serial else float("nan")
        print(
            f"{name:<20} {args.rounds:>6} {len(failures):>5} {r['median_s']:>9.2f} {r['p90_s']:>7.2f} {r['max_s']:>7.2f}"
            f" {base_s:>16.2f} {r['median_s'] / base_s:>6.2f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not any(r["failures"] for r in results.values()):
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"failed rounds' folders kept under {root}")
    return 1 if any(r["failures"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
