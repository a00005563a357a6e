"""Every benchmark with its goals (``make bench``). Inputs are generated into bench/out/ (gitignored)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHES = [
    [str(HERE / "bench_demand.py")],  # 1,000,000 jobs, 500 shapes, 200 entries
]

if __name__ == "__main__":
    failed = 0
    for argv in BENCHES:
        print(f"$ python {' '.join(Path(a).name if a.endswith('.py') else a for a in argv)}", flush=True)
        failed += subprocess.run([sys.executable, *argv, *sys.argv[1:]]).returncode != 0
    sys.exit(1 if failed else 0)
