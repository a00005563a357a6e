"""``python -m tests.soak --minutes N``: the soak on 127.0.0.1 (make soak: 20 minutes; CI: a short form).

Exits non-zero if any end check failed; prints its figures either way.
"""

from __future__ import annotations

import argparse
import signal
import sys

from tests.soak.soak import Soak


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the demand scenario (default 20)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs) even when green")
    args = parser.parse_args()
    soak = Soak(args.minutes, keep=args.keep)

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)  # tear down (every component, PostgreSQL) on a stop too
    try:
        soak.setup()
        soak.run()
        soak.check()
        soak.report()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - report, tear down, fail
        soak.failures.append(f"{type(exc).__name__}: {exc}")
        print(f"soak aborted: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        soak.teardown()
    print("soak: 1 passed, 0 failed" if not soak.failures else "soak: 0 passed, 1 failed")
    return 1 if soak.failures else 0


if __name__ == "__main__":
    sys.exit(main())
