"""``python -m sa_envelope``: the same as the ``sa-envelope`` command."""

import sys

from .cli import main

sys.exit(main())
