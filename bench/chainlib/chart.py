"""The benchmark's PNG: latency percentiles and throughput by concurrency, one colour per chain."""

import matplotlib

# No display on the machines this runs on; Agg renders straight to a file.
matplotlib.use("Agg")

from matplotlib import pyplot  # noqa: E402  (the backend must be chosen first)

_PERCENTILES = (("p50_ms", "p50", "o", "-"), ("p90_ms", "p90", "s", "--"), ("p99_ms", "p99", "^", ":"))


def draw(path, runs, title):
    """
    Write the chart of ``runs`` (chain name -> wrk results by level, baseline first) to ``path``.

    Left: p50/p90/p99 latency (ms) by connections, one colour per chain, one line style per percentile.
    Right: requests per second by connections, one bar per chain.
    """
    figure, (latency, throughput) = pyplot.subplots(1, 2, figsize=(13, 5.5), dpi=110)
    colours = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(runs)
    levels = sorted({run.connections for results in runs.values() for run in results})
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        colour = colours[index % len(colours)]
        results = sorted(runs[name], key=lambda run: run.connections)
        x = [run.connections for run in results]
        for field, label, marker, style in _PERCENTILES:
            latency.plot(x, [getattr(run, field) for run in results], marker=marker, linestyle=style, color=colour,
                         label=f"{name} {label}")
        positions = [levels.index(run.connections) + (index - (len(names) - 1) / 2) * width for run in results]
        bars = throughput.bar(positions, [run.rps for run in results], width, color=colour, label=name)
        throughput.bar_label(bars, fmt="%.0f", fontsize=7)
    latency.set(title="Latency (excludes think time)", xlabel="concurrent connections", ylabel="ms", xticks=levels)
    latency.set_ylim(bottom=0)
    latency.grid(alpha=0.3)
    latency.legend(fontsize=7, ncol=len(names))
    throughput.set(title="Throughput", xlabel="concurrent connections", ylabel="requests / second",
                   xticks=range(len(levels)), xticklabels=[str(level) for level in levels])
    throughput.grid(axis="y", alpha=0.3)
    throughput.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
