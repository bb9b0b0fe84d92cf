# edgephi: run tasks inside a booted systemd-nspawn guest through nsenter (tests, local try-outs).
# SPDX-License-Identifier: Apache-2.0
# ruff: noqa: E402  (Ansible plugins put DOCUMENTATION before the imports)
"""Connection plugin ``nspawn``: commands and files go into a running systemd-nspawn guest through ``nsenter``.

community.general has no nspawn connection, and ``machinectl``/``systemd-run --machine`` need systemd-machined
on the controller, which is absent where the controller's PID 1 is not systemd (CI). ``nsenter -t LEADER -a``
joins every namespace of the guest's PID 1 (mount, PID, network, UTS, IPC, cgroup), so a command run this way
sees exactly what the guest's services see.
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: nspawn
short_description: Run tasks in a running systemd-nspawn guest through nsenter
description:
  - Runs commands with C(nsenter -t LEADER -a /bin/sh -c CMD) on the controller, where LEADER is the host PID
    of the guest's systemd (PID 1 inside the guest); copies files in and out through C(cat).
  - The controller must be the container host and run as root.
author: edgephi
options:
  leader:
    description:
      - Host PID of the guest's init (the child of the C(systemd-nspawn) process).
    type: string
    vars:
      - name: ansible_nspawn_leader
    env:
      - name: ANSIBLE_NSPAWN_LEADER
  nsenter_exe:
    description: The nsenter binary on the controller.
    type: string
    default: nsenter
    vars:
      - name: ansible_nspawn_nsenter_exe
  executable:
    description: Shell used inside the guest.
    type: string
    default: /bin/sh
    vars:
      - name: ansible_executable
  remote_addr:
    description: The guest's name (only used in messages and for the default leader file).
    type: string
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: ansible_host
extends_documentation_fragment:
  - connection_pipelining
"""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

display = Display()

# A clean environment for the guest side: nothing of the controller's (virtualenv, PYTHONPATH) leaks in.
_GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "TERM": "dumb",
}


class Connection(ConnectionBase):
    """nsenter into a running systemd-nspawn guest."""

    transport = "nspawn"
    has_pipelining = True
    has_tty = False
    default_user = "root"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._argv_prefix: list[str] = []

    def _leader(self) -> int:
        value = self.get_option("leader")
        if not value:
            raise AnsibleConnectionFailure(f"nspawn: set ansible_nspawn_leader for {self.get_option('remote_addr')}")
        try:
            pid = int(value)
        except ValueError as exc:
            raise AnsibleConnectionFailure(f"nspawn: ansible_nspawn_leader is not a PID: {value!r}") from exc
        if not Path(f"/proc/{pid}/ns/mnt").exists():
            raise AnsibleConnectionFailure(f"nspawn: guest leader PID {pid} is not running")
        return pid

    def _connect(self):
        if not self._connected:
            if os.geteuid() != 0:
                raise AnsibleConnectionFailure("nspawn connection requires running as root (nsenter)")
            exe = self.get_option("nsenter_exe")
            path = exe if os.path.isabs(exe) else shutil.which(exe)
            if not path:
                raise AnsibleConnectionFailure(f"nspawn: {exe} not found (apt-get install util-linux)")
            self._argv_prefix = [path, "-t", str(self._leader()), "-a"]
            display.vvv(f"NSPAWN CONNECT {' '.join(self._argv_prefix)}", host=self.get_option("remote_addr"))
            self._connected = True
        return self

    def _popen(self, cmd: str, stdin=subprocess.PIPE) -> subprocess.Popen:
        self._connect()
        argv = [*self._argv_prefix, self.get_option("executable"), "-c", cmd]
        display.vvvv(f"NSPAWN EXEC {argv}", host=self.get_option("remote_addr"))
        return subprocess.Popen(
            [to_bytes(a, errors="surrogate_or_strict") for a in argv],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_GUEST_ENV,
        )

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        p = self._popen(cmd)
        stdout, stderr = p.communicate(in_data)
        return p.returncode, stdout, stderr

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        display.vvv(f"PUT {in_path} TO {out_path}", host=self.get_option("remote_addr"))
        if not os.path.exists(to_bytes(in_path, errors="surrogate_or_strict")):
            raise AnsibleFileNotFound(f"file or module does not exist: {in_path}")
        with open(to_bytes(in_path, errors="surrogate_or_strict"), "rb") as src:
            p = self._popen(f"cat > {shlex.quote(out_path)}", stdin=src)
            stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise AnsibleError(f"failed to transfer {in_path} to {out_path}: {stdout!r} {stderr!r}")

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self.get_option("remote_addr"))
        with open(to_bytes(out_path, errors="surrogate_or_strict"), "wb") as dst:
            p = self._popen(f"cat {shlex.quote(in_path)}", stdin=subprocess.DEVNULL)
            assert p.stdout is not None
            shutil.copyfileobj(p.stdout, dst)
            _, stderr = p.communicate()
        if p.returncode != 0:
            raise AnsibleError(f"failed to fetch {in_path} to {out_path}: {stderr!r}")

    def close(self):
        super().close()
        self._connected = False
