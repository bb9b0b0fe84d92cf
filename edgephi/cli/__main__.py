"""``python -m edgephi.cli``: the ``edgephi`` command."""

from edgephi.cli import main

raise SystemExit(main())
