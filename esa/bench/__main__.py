"""``python -m esa.bench``: see esa.bench.cli."""

import sys

from esa.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
