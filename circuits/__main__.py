"""``python -m circuits ...`` runs the command line (same as the ``circuits`` script)."""

from .cli import main

raise SystemExit(main())
