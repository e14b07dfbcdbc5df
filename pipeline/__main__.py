"""``python -m pipeline``: the ``pipeline`` command (how ``cache-tools check`` runs ``pipeline check``)."""
import sys

from pipeline.cli import main

sys.exit(main())
