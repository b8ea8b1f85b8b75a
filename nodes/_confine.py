"""What a sandboxed process does to itself before user code runs: limits, no privileges, seccomp.

Runs inside the sandbox (python attempts and the JavaScript worker), so it imports only the
standard library. Every step only ever narrows what the process may do.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import signal
import struct
from collections.abc import Iterable, Mapping

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CLONE_NEWUSER = 0x10000000

# Classic BPF, as seccomp takes it.
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45
BPF_RET_K = 0x06
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_KILL_PROCESS = 0x80000000
# struct seccomp_data: nr, arch, instruction_pointer, args[6] (the low half first on these arches).
OFFSET_NR = 0
OFFSET_ARCH = 4
OFFSET_ARG0 = 16
OFFSET_ARG1 = 24
EPERM = 1
ENOSYS = 38
X32_SYSCALL_BIT = 0x40000000
TIOCSTI = 0x5412
# clone() flags that create namespaces: user code gets none of them.
CLONE_NEW_FLAGS = 0x7E020080

# Calls user code never needs and that widen the kernel's attack surface or reach outside the
# attempt: debugging other processes, mounts and namespaces, keyrings, BPF, perf, userfaultfd,
# modules, the clock, rebooting. Numbers per architecture (asm/unistd_64.h, asm-generic/unistd.h).
DENIED_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "ptrace": 101, "syslog": 103, "uselib": 134, "vhangup": 153, "modify_ldt": 154,
        "pivot_root": 155, "_sysctl": 156, "adjtimex": 159, "chroot": 161, "acct": 163,
        "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
        "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173,
        "create_module": 174, "init_module": 175, "delete_module": 176, "quotactl": 179,
        "nfsservctl": 180, "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246,
        "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "move_pages": 279,
        "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
        "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310,
        "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "kexec_file_load": 320,
        "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_getfd": 438, "mount_setattr": 442,
    },
    "aarch64": {
        "lookup_dcookie": 18, "umount2": 39, "mount": 40, "pivot_root": 41, "chroot": 51,
        "vhangup": 58, "quotactl": 60, "acct": 89, "unshare": 97, "kexec_load": 104,
        "init_module": 105, "delete_module": 106, "clock_settime": 112, "syslog": 116,
        "ptrace": 117, "reboot": 142, "sethostname": 161, "setdomainname": 162,
        "settimeofday": 170, "adjtimex": 171, "add_key": 217, "request_key": 218, "keyctl": 219,
        "swapon": 224, "swapoff": 225, "move_pages": 239, "perf_event_open": 241,
        "fanotify_init": 262, "name_to_handle_at": 264, "open_by_handle_at": 265,
        "clock_adjtime": 266, "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271,
        "kcmp": 272, "finit_module": 273, "bpf": 280, "userfaultfd": 282,
        "kexec_file_load": 294, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_getfd": 438, "mount_setattr": 442,
    },
}  # fmt: skip
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
CLONE = {"x86_64": 56, "aarch64": 220}
CLONE3 = 435
IOCTL = {"x86_64": 16, "aarch64": 29}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what} failed: {os.strerror(errno)}")


def seccomp_supported() -> bool:
    return platform.machine() in DENIED_SYSCALLS


def seccomp_program(machine: str) -> bytes:
    """The filter: wrong architecture kills, denied calls fail with EPERM, the rest run."""
    program: list[tuple[int, int, int, int]] = []

    def emit(code: int, jt: int, jf: int, k: int) -> None:
        program.append((code, jt, jf, k))

    def deny_if(number: int, errno: int = EPERM) -> None:
        emit(BPF_JEQ_K, 0, 1, number)
        emit(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno)

    def deny_if_argument(number: int, offset: int, test: int, value: int) -> None:
        # The block ends in a return: it leaves an argument, not the call's number, loaded.
        emit(BPF_JEQ_K, 0, 4, number)
        emit(BPF_LD_W_ABS, 0, 0, offset)
        emit(test, 0, 1, value)
        emit(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM)
        emit(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)

    emit(BPF_LD_W_ABS, 0, 0, OFFSET_ARCH)
    emit(BPF_JEQ_K, 1, 0, AUDIT_ARCH[machine])
    emit(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS)
    emit(BPF_LD_W_ABS, 0, 0, OFFSET_NR)
    if machine == "x86_64":
        # The x32 ABI reaches the same kernel calls under other numbers.
        emit(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT)
        emit(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM)
    for number in sorted(DENIED_SYSCALLS[machine].values()):
        deny_if(number)
    # clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc fall back to clone.
    deny_if(CLONE3, ENOSYS)
    # clone: threads and forks run, new namespaces do not.
    deny_if_argument(CLONE[machine], OFFSET_ARG0, BPF_JSET_K, CLONE_NEW_FLAGS)
    # ioctl(TIOCSTI) would type into a terminal the node shares.
    deny_if_argument(IOCTL[machine], OFFSET_ARG1, BPF_JEQ_K, TIOCSTI)
    emit(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp() -> None:
    """Load the filter for this machine's architecture; needs no_new_privs first."""
    program = seccomp_program(platform.machine())
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0),
        "prctl(PR_SET_SECCOMP)",
    )


class _CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapabilityData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_privileges() -> None:
    """Give up every capability for good and forbid gaining any: no later exec regains them."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT)")
    capability = 0
    # Dropping from the bounding set needs CAP_SETPCAP; without it there is nothing to keep.
    while _libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) == 0:
        capability += 1
    header = _CapabilityHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapabilityData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def keep_capabilities(numbers: Iterable[int]) -> None:
    """Keep only these capabilities (effective and permitted); the bounding set is left alone."""
    mask = [0, 0]
    for number in numbers:
        mask[number // 32] |= 1 << (number % 32)
    header = _CapabilityHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapabilityData * 2)()
    for index in (0, 1):
        data[index].effective = data[index].permitted = mask[index]
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies: our own code may never get to."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def enter_user_namespace(sandbox_uid: int, inside_uid: int, namespaces: int = 0) -> None:
    """Become `sandbox_uid` if root, then `inside_uid` of a new user namespace of our own.

    `namespaces` are further CLONE_NEW* flags, created with it (its privileges are what allow it).
    """
    if os.geteuid() == 0:
        # Root's processes are exempt from RLIMIT_NPROC, and root could read what a bind reveals.
        os.setgroups([])
        os.setresgid(sandbox_uid, sandbox_uid, sandbox_uid)
        os.setresuid(sandbox_uid, sandbox_uid, sandbox_uid)
        set_dumpable()
    outer_uid, outer_gid = os.getuid(), os.getgid()
    # The namespace's uid is the sandbox's on the host, but the kernel counts the processes
    # under RLIMIT_NPROC per user namespace: the limit binds this process, not every sandbox.
    _check(_libc.unshare(CLONE_NEWUSER | namespaces), f"unshare({CLONE_NEWUSER | namespaces:#x})")
    with open("/proc/self/setgroups", "w") as setgroups:
        setgroups.write("deny")
    with open("/proc/self/uid_map", "w") as uid_map:
        uid_map.write(f"{inside_uid} {outer_uid} 1")
    with open("/proc/self/gid_map", "w") as gid_map:
        gid_map.write(f"{inside_uid} {outer_gid} 1")


def set_dumpable(dumpable: bool = True) -> None:
    """A process that changed its uid may write its own /proc/self/{uid,gid}_map again; one that
    is not dumpable leaves no core dump, and only root may ptrace it or read its /proc files."""
    _check(_libc.prctl(PR_SET_DUMPABLE, int(dumpable), 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def confine(limits: Mapping[int, int]) -> None:
    """The last steps before untrusted code runs, in the order that keeps each possible: lower
    the resource `limits`, give up every privilege, then install the seccomp filter (if this
    architecture has one)."""
    for which, limit in limits.items():
        lower_limit(which, limit)
    drop_privileges()
    if seccomp_supported():
        install_seccomp()


def lower_limit(which: int, limit: int) -> None:
    """Set a resource limit, never above what the process already has."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(which, (limit, limit))
