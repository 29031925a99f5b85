"""``python -m pymerge``: the ``pymerge`` command line (``python -m pymerge demo``).

Prefer the installed ``pymerge`` command: ``python -m`` puts the current folder first on
``sys.path``, so run from a source checkout it imports the source tree, which lacks the
compiled modules (``pymerge demo`` warns when that happens).
"""

import sys

from pymerge.cli import main

if __name__ == "__main__":
    sys.exit(main())
