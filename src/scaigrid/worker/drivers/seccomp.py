"""The default seccomp profile of container bunkers, as an OCI ``linux.seccomp`` object.

Shape (OCI runtime-spec 1.0.2, ``config-linux.md#seccomp``): default action ``SCMP_ACT_ALLOW``
with a deny list, in the spirit of Docker's default profile
(https://github.com/moby/moby/blob/master/profiles/seccomp/default.json) but inverted: Docker
allow-lists and we deny-list, because a bunker must run arbitrary workloads (compilers,
language runtimes, debuggers) and the other layers (user namespace, dropped capabilities,
``noNewPrivileges``, cgroups) already bound what an allowed syscall can do.

Denied with ``EPERM``: the syscalls that reach kernel surface a sandboxed workload never needs
and that have a long history of privilege escalations — mounting (old and new mount API),
creating or joining namespaces (``unshare``, ``setns``, and ``clone`` with any ``CLONE_NEW*``
flag), the kernel keyring, eBPF, perf events, ``userfaultfd``, io_uring, kexec, kernel
modules, reboot, swap, ``open_by_handle_at``, process accounting, raw port I/O, quotas,
setting the clock, and a few obsolete calls. ``clone3`` answers ``ENOSYS`` (as in Docker) so
libc falls back to ``clone``, whose flags a classic BPF filter can inspect. ``ptrace`` and
``process_vm_*`` stay allowed (debuggers work; the kernel's own ptrace checks apply).
"""

from __future__ import annotations

import errno
from typing import Any

#: Syscalls answered with EPERM whatever their arguments.
DENIED_SYSCALLS: tuple[str, ...] = (
    # mounting, old and new API
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    # namespaces
    "unshare",
    "setns",
    # kernel keyring
    "keyctl",
    "add_key",
    "request_key",
    # eBPF, perf, userfaultfd, io_uring
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    # kernel replacement and modules
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "query_module",
    "get_kernel_syms",
    # host state
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "stime",
    "syslog",
    "vhangup",
    "lookup_dcookie",
    "nfsservctl",
    # file handles bypass path-based confinement
    "open_by_handle_at",
    "name_to_handle_at",
    # raw port I/O
    "iopl",
    "ioperm",
    # obsolete
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "vm86",
    "vm86old",
)

#: ``clone`` flags that create namespaces; ``clone`` with any of them is denied.
CLONE_NAMESPACE_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

#: Architectures the filter covers: 64-bit, 32-bit compat and x32 binaries on x86_64 hosts.
ARCHITECTURES: tuple[str, ...] = ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")


def default_profile() -> dict[str, Any]:
    """Return the OCI ``linux.seccomp`` object every container bunker runs under.

    Returns:
        ``{"defaultAction": "SCMP_ACT_ALLOW", "architectures": [...], "syscalls": [...]}``;
        each rule is ``{"names", "action": "SCMP_ACT_ERRNO", "errnoRet", "args"?}``. A rule
        with ``args`` uses ``SCMP_CMP_MASKED_EQ`` with ``value`` = mask and ``valueTwo`` =
        expected masked value (libseccomp's ``SCMP_A0(SCMP_CMP_MASKED_EQ, mask, datum)``).
    """
    rules: list[dict[str, Any]] = [
        {"names": list(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
    ]
    for flag in CLONE_NAMESPACE_FLAGS.values():
        rules.append(
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EPERM,
                "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
            }
        )
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": list(ARCHITECTURES),
        "syscalls": rules,
    }
