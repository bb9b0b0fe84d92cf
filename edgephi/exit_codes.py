"""Every exit status of the ``edgephi`` command and the daemon, in one place.

systemd reads them (``RestartPreventExitStatus=78`` in the unit: a configuration error is not retried), so do
Ansible and scripts. The values follow BSD ``sysexits.h`` where one fits (75 ``EX_TEMPFAIL``, 78 ``EX_CONFIG``).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    #: A runtime failure: the engine died or failed to load, an RPC failed, a download or check failed.
    FAILED = 1
    #: The command line is wrong (argparse's own code): unknown option, bad value; the message names the fix.
    USAGE = 2
    #: The work was refused before it started because it would not fit or is not allowed (e.g. an artifact
    #: that exists, a quantize profile that does not fit the card); the message says why.
    REFUSED = 3
    #: The memory guard's hard limit: the daemon drained and exited for a restart (``EX_TEMPFAIL``).
    MEMORY = 75
    #: A configuration error: settings, files, ports, preflight (``EX_CONFIG``); systemd does not restart.
    CONFIG = 78
