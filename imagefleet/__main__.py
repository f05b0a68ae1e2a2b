"""``python -m imagefleet`` is the same as the ``imagefleet`` command."""

from imagefleet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
