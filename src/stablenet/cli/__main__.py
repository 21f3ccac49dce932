"""``python -m stablenet.cli``: the ``stablenet`` command, also under ``torchrun -m stablenet.cli -- certify ...``."""

import sys

from stablenet.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
