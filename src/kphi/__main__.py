"""``python -m kphi`` is the ``kphi`` command."""

import sys

from .cli import main

sys.exit(main())
