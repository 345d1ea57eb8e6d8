"""
Turn trial's closing line, e.g. ``FAILED (failures=1, successes=9)``, into ``N passed, N failed``. A skipped test
counts as failed (and is reported on a line of its own): CI runs every test, so a skip means something was not
tested, such as a missing redis-server.
"""

import re
import sys


def summarize(text):
    match = None
    for match in re.finditer(r"^(PASSED|FAILED) \(([^)]*)\)", text, re.MULTILINE):
        pass
    if match is None:
        return 0, 1, 0  # trial never reached its summary: count the run as failed
    counts = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2)))
    passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
    skipped = counts.get("skips", 0)
    failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0) + skipped
    return passed, failed, skipped


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8", errors="replace") as f:
        passed, failed, skipped = summarize(f.read())
    if skipped:
        print(f"{skipped} skipped (counted as failed)")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
