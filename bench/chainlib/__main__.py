"""``python -m bench.chainlib``: the benchmark's command line (``bench/chain`` runs this)."""

from bench.chainlib.cli import main

main()
