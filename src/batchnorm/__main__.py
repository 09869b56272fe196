"""``python -m batchnorm``: the ``batchnorm`` command (see :mod:`batchnorm.cli`)."""

import sys

from batchnorm.cli import main

if __name__ == "__main__":
    sys.exit(main())
