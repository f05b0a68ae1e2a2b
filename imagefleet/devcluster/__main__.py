"""``python -m imagefleet.devcluster up|down|env``: see :mod:`imagefleet.devcluster.controlplane`."""

import sys

from imagefleet.devcluster.controlplane import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m imagefleet.devcluster"))
