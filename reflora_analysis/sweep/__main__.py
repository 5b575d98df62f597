"""``python -m reflora_analysis.sweep ...``: the ``reflora-analysis sweep`` sub-command."""

import sys

from .commandline import main

sys.exit(main())
