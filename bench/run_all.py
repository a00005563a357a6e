"""Every benchmark with its goals (``make bench``). Inputs are generated into bench/out/ (gitignored)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BENCHES = [
    "bench.bench_demand",  # 1,000,000 jobs, 500 shapes, 200 entries
    "bench.bench_budget",  # token cost; 500 Nova servers within 500 calls / 5 min
    "bench.bench_factory_scale",  # inventory + reaping over 10,000 pilots in 20 entries
    "bench.bench_factory_100k",  # the factory cycle at 100,000 pilots in 200 entries under listing lag; moto beside
    "bench.bench_boot_storm",  # 10,000 pilots exchange and upload against two bootstrap service processes
    "bench.bench_pilots_page",  # the Pilots page over 100,000 pilots and 30 days of history
]

if __name__ == "__main__":
    failed = 0
    for module in BENCHES:
        print(f"$ python -m {module}", flush=True)
        failed += subprocess.run([sys.executable, "-m", module], cwd=REPO).returncode != 0
    sys.exit(1 if failed else 0)
