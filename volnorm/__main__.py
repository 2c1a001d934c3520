"""``python -m volnorm`` is the ``volnorm`` command."""

from __future__ import annotations

import sys

from volnorm.cli import main

if __name__ == "__main__":
    sys.exit(main())
