"""
The benchmark's figures: baseline vs candidate per concurrency level, laid out as the product's performance table
(# Requests, Req/second, Median, p90, p99, then a Result row of ratios and differences), and issue 7's targets.
"""

import attrs

#: The product's published Result rows (requests %, req/s %, median/p90/p99 differences in ms) by connections, for
#: reference beside ours: the figures to beat.
PRODUCT_RESULTS = {
    100: (98.9, 98.5, 10, 12, 0),
    200: (97.8, 97.8, 17, 44, 80),
    250: (94.8, 95.1, 45, 98, 150),
    300: (84.3, 84.3, 202, 258, 260),
}


@attrs.frozen
class Targets:
    """Issue 7's bar: candidate throughput >= ``min_rps_ratio`` of the baseline, and latency differences at most."""

    min_rps_ratio: float
    max_p50_diff_ms: float | None = None
    max_p99_diff_ms: float | None = None


#: With think time: the relay against the control.
THINK_TARGETS = Targets(min_rps_ratio=0.99, max_p50_diff_ms=5.0, max_p99_diff_ms=30.0)
#: Saturation: the relay against the plain two-hop proxy chain.
SATURATION_TARGETS = Targets(min_rps_ratio=0.85)


@attrs.frozen
class Comparison:
    """One concurrency level: a candidate's wrk result against the baseline's."""

    baseline: object
    candidate: object

    @property
    def connections(self):
        return self.baseline.connections

    @property
    def requests_ratio(self):
        return _ratio(self.candidate.requests, self.baseline.requests)

    @property
    def rps_ratio(self):
        return _ratio(self.candidate.rps, self.baseline.rps)

    @property
    def p50_diff_ms(self):
        return self.candidate.p50_ms - self.baseline.p50_ms

    @property
    def p90_diff_ms(self):
        return self.candidate.p90_ms - self.baseline.p90_ms

    @property
    def p99_diff_ms(self):
        return self.candidate.p99_ms - self.baseline.p99_ms

    def failures(self, targets):
        """The targets this level misses, as short phrases (empty when it meets them all); errors always fail."""
        missed = []
        if self.candidate.errors.total or self.baseline.errors.total:
            missed.append("errors")
        if self.rps_ratio < targets.min_rps_ratio:
            missed.append(f"req/s {self.rps_ratio:.1%} < {targets.min_rps_ratio:.0%}")
        if targets.max_p50_diff_ms is not None and self.p50_diff_ms > targets.max_p50_diff_ms:
            missed.append(f"p50 {self.p50_diff_ms:+.1f} ms > +{targets.max_p50_diff_ms:g} ms")
        if targets.max_p99_diff_ms is not None and self.p99_diff_ms > targets.max_p99_diff_ms:
            missed.append(f"p99 {self.p99_diff_ms:+.1f} ms > +{targets.max_p99_diff_ms:g} ms")
        return missed

    def as_json(self, targets):
        return {
            "connections": self.connections,
            "requests_ratio": self.requests_ratio,
            "rps_ratio": self.rps_ratio,
            "p50_diff_ms": self.p50_diff_ms,
            "p90_diff_ms": self.p90_diff_ms,
            "p99_diff_ms": self.p99_diff_ms,
            "missed_targets": self.failures(targets),
        }


def _ratio(part, whole):
    return part / whole if whole else 0.0


def compare(baseline_runs, candidate_runs):
    """Pair two lists of wrk results by connections (levels only one side has are left out)."""
    by_level = {run.connections: run for run in baseline_runs}
    return [Comparison(by_level[run.connections], run) for run in candidate_runs if run.connections in by_level]


_ROW = "{:<16}{:>12}{:>12}{:>13}{:>11}{:>11}{:>9}"


def _measured_row(label, run):
    return _ROW.format(
        label,
        run.requests,
        f"{run.rps:.1f}",
        f"{run.p50_ms:.2f}",
        f"{run.p90_ms:.2f}",
        f"{run.p99_ms:.2f}",
        run.errors.total,
    )


def _result_row(label, requests_pct, rps_pct, p50, p90, p99, extra=""):
    return _ROW.format(
        label, f"{requests_pct:.1f}%", f"{rps_pct:.1f}%", f"{p50:+.1f}ms", f"{p90:+.1f}ms", f"{p99:+.1f}ms", extra
    )


def render_level(comparison, baseline_name, candidate_name, load_text, targets):
    """One level as the product lays it out, plus the product's own Result row and the targets' verdict."""
    lines = [
        f"{comparison.connections} concurrent connections, {load_text}",
        _ROW.format("", "# Requests", "Req/second", "Median (ms)", "p90 (ms)", "p99 (ms)", "Errors"),
        _measured_row(baseline_name, comparison.baseline),
        _measured_row(candidate_name, comparison.candidate),
        _result_row(
            "Result",
            100 * comparison.requests_ratio,
            100 * comparison.rps_ratio,
            comparison.p50_diff_ms,
            comparison.p90_diff_ms,
            comparison.p99_diff_ms,
        ),
    ]
    product = PRODUCT_RESULTS.get(comparison.connections)
    if product and targets is THINK_TARGETS:
        lines.append(_result_row("Product result", *product))
    missed = comparison.failures(targets)
    lines.append("Targets: " + ("met" if not missed else "MISSED (" + "; ".join(missed) + ")"))
    return "\n".join(lines)


def render(comparisons, baseline_name, candidate_name, load_text, targets):
    """The whole table for one candidate, level after level."""
    title = f"== {candidate_name} against {baseline_name} =="
    return "\n\n".join([title] + [render_level(c, baseline_name, candidate_name, load_text, targets) for c in comparisons])
