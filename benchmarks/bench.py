"""The benchmark of `python -m funchess bench`, as a script: `python benchmarks/bench.py [options]`.

Everything lives in the package's command line (`funchess/cli/bench.py`: planning and
fresh-process runs; `funchess/cli/methods.py`: the methods and the oracle check;
`funchess/cli/report.py`: results, tables and the plot), so that `pip install "funchess[cli]"`
users run the same code. Options are those of
`python -m funchess bench --help`; e.g.

    python benchmarks/bench.py --quick                   # about a minute
    python benchmarks/bench.py --threads 1 --out out/    # the full run (about 10 minutes on 2 cores)
    python benchmarks/bench.py --device cuda --quick     # on a GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's funchess
    from funchess.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
