"""`python -m stts_adapter.cli`: the same as the `stts-adapter` command."""

import sys

from .main import main

sys.exit(main())
