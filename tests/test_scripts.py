"""The CI summary: trial's closing line turned into ``N passed, N failed``."""

import importlib.util
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "trial_summary.py")
_spec = importlib.util.spec_from_file_location("trial_summary", SCRIPT)
trial_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trial_summary)


class SummaryTests(SynchronousTestCase):
    def test_counts(self):
        """Successes and expected failures pass; failures, errors, unexpected successes and skips fail."""
        cases = {
            "PASSED (successes=331)": (331, 0, 0),
            "FAILED (failures=1, errors=2, successes=9)": (9, 3, 0),
            "PASSED (expectedFailures=1, successes=4)": (5, 0, 0),
            "FAILED (unexpectedSuccesses=1, successes=4)": (4, 1, 0),
            "PASSED (skips=2, successes=5)": (5, 2, 2),
        }
        for line, expected in cases.items():
            self.assertEqual(trial_summary.summarize(f"Ran 9 tests\n\n{line}\n"), expected, line)

    def test_no_summary_is_a_failure(self):
        """A run that never printed trial's summary (a crash, a kill) counts as failed."""
        self.assertEqual(trial_summary.summarize("Traceback (most recent call last):\n"), (0, 1, 0))

    def test_last_summary_wins_and_sets_the_exit_status(self):
        """The closing summary decides, even after a test's own output printed a summary-like line."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("PASSED (successes=1)\n...\nFAILED (errors=1, successes=3)\n")
        result = subprocess.run([sys.executable, SCRIPT, path], capture_output=True, text=True)
        self.assertEqual((result.stdout, result.returncode), ("3 passed, 1 failed\n", 1))
        with open(path, "w") as f:
            f.write("PASSED (skips=1, successes=3)\n")
        result = subprocess.run([sys.executable, SCRIPT, path], capture_output=True, text=True)
        self.assertEqual((result.stdout, result.returncode), ("1 skipped (counted as failed)\n3 passed, 1 failed\n", 1))
