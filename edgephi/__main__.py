"""``python -m edgephi``: the ``edgephi`` command."""

from edgephi.cli import main

raise SystemExit(main())
