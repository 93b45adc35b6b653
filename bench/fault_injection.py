"""The fault-injection suite (tests/test_faults.py) with more kills and other random kill moments: every stage (train,
experts, distill, LESS selection, a small experiment) is SIGKILLed KILLS times at random moments after it writes a
checkpoint, resumed, and compared bit for bit with an uninterrupted run.

    python bench/fault_injection.py [--kills 10] [--seeds 0 1 2]

Prints one line per (seed, outcome) and exits non-zero when any run differs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    failed = 0
    for seed in args.seeds:
        env = {**os.environ, "TEXTDISTILL_FAULT_KILLS": str(args.kills), "TEXTDISTILL_FAULT_SEED": str(100 * seed)}
        start = time.time()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 str(root / "tests" / "test_faults.py")], env=env, cwd=root, capture_output=True,
                                text=True)
        summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"seed {seed}, {args.kills} kills per stage: {summary} ({time.time() - start:.0f} s)")
        failed += result.returncode != 0
        if result.returncode != 0:
            print(result.stdout[-4000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
