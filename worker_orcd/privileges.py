"""Running unprivileged (SPEC 4900-4903): the root policy and the one-way privilege drop.

The worker should be started unprivileged (systemd ``DynamicUser=``, a container's
``USER``). Started as root it refuses to run unless ``--user NAME`` says whom to
become; it then opens the device and binds the port as root and drops for good
before it reads a single model byte or serves a request.

Linux keeps capabilities, the bounding set and no_new_privs per thread, and the
CUDA driver / torch start threads while the device opens. So the drop comes in
two steps: ``harden_early()`` runs before any thread exists (no_new_privs,
ambient and inheritable sets cleared, and, when started unprivileged, every
capability: later threads inherit all of it), and ``drop()`` runs after the
device and the socket. glibc applies setgroups /
setresgid / setresuid to every thread, and the kernel empties a thread's
effective, permitted and ambient sets when its uids all leave 0. ``verify()``
then reads ``/proc/self/task/*/status`` and refuses to go on unless every
thread shows the target ids, no groups, no_new_privs and empty sets. Only the
calling (main) thread's bounding set can be emptied from here; with
no_new_privs set and no permitted capabilities, another thread's bounding set
grants nothing (it only limits what an exec could gain).
"""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ErrorCode, WorkerError

# prctl(2) options and capget/capset(2) ABI, from <linux/prctl.h> / <linux/capability.h>.
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_SETPCAP = 8


class PrivilegeError(WorkerError):
    """The worker cannot run with the privileges it was given, or could not shed them."""

    code = ErrorCode.INTERNAL


@dataclass(frozen=True)
class Account:
    """Whom the worker becomes: uid and primary gid from the user database."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class DropPlan:
    """What serve() does once the device is open and the port bound.

    ``target`` set: switch to that account (we are root). ``None``: we already run as an
    unprivileged user; only shed whatever capabilities we were handed.
    """

    target: Account | None


@dataclass(frozen=True)
class ThreadCreds:
    """The privilege lines of one /proc/.../status file."""

    tid: int
    uids: tuple[int, ...]
    gids: tuple[int, ...]
    groups: tuple[int, ...]
    no_new_privs: bool
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int


def lookup_account(user: str) -> Account:
    """``--user`` as a name or a numeric uid; root is refused (dropping to root drops nothing)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise PrivilegeError(f"--user {user}: no such user") from None
        try:
            pw = pwd.getpwuid(int(user))
        except KeyError:
            raise PrivilegeError(f"--user {user}: no user has uid {user}") from None
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise PrivilegeError(f"--user {user}: must name an unprivileged user, not uid/gid 0")
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid)


def decide(user: str | None, allow_root: bool, euid: int) -> DropPlan | None:
    """SPEC 4900-4903 as a decision; ``None`` = stay as is (root, by explicit --allow-root).

    Raises PrivilegeError (the CLI exits 2) for root without --user or --allow-root, and for
    --user naming someone else when we are not root (only root can switch users).
    """
    if euid == 0:
        if user is not None:
            return DropPlan(lookup_account(user))
        if allow_root:
            return None
        raise PrivilegeError(
            "refusing to run as root (SPEC 4900): start worker-orcd as an unprivileged user "
            "(systemd DynamicUser=yes, a container USER), or pass --user NAME to open the GPU and bind "
            "the port as root and then drop to NAME; --allow-root keeps root (development/CI only)"
        )
    if user is not None:
        account = lookup_account(user)
        if account.uid != euid:
            raise PrivilegeError(f"--user {user}: only root can switch users; this process runs as uid {euid}")
    return DropPlan(None)


def harden_early(plan: DropPlan) -> None:
    """Before any thread exists: what every later thread must inherit.

    Always no_new_privs and empty ambient / inheritable sets (they cost root nothing). Started
    unprivileged, there is nothing to open or bind that needs a capability, so any capability
    handed to us goes now, while a capset on this one thread still covers the whole process.
    """
    _prctl(PR_SET_NO_NEW_PRIVS, 1, what="set no_new_privs")
    _clear_ambient()
    if plan.target is None:
        _shed()
    else:
        eff, prm, _ = _capget()
        _capset(eff, prm, 0)  # root keeps effective/permitted until drop(); nothing passes an exec


def drop(plan: DropPlan) -> None:
    """After the device is open and the socket bound: become ``plan.target`` for good, or shed capabilities."""
    target = plan.target
    if target is not None:
        if os.geteuid() != 0:
            raise PrivilegeError(f"cannot switch to user {target.name}: this process is not root")
        _drop_bounding_set()  # needs CAP_SETPCAP: before setuid takes it away
        _prctl(PR_SET_KEEPCAPS, 0, what="clear keep-caps")
        try:
            os.setgroups([])  # supplementary groups first: after setgid/setuid we could not
            os.setresgid(target.gid, target.gid, target.gid)
            os.setresuid(target.uid, target.uid, target.uid)
        except OSError as e:
            raise PrivilegeError(f"cannot switch to user {target.name} (uid {target.uid}): {e.strerror}") from None
    _shed()
    verify(plan)


def _shed() -> None:
    """Empty this thread's capability sets (and the bounding set while CAP_SETPCAP allows it)."""
    if _capget()[0] & (1 << _CAP_SETPCAP):
        _drop_bounding_set()
    _clear_ambient()
    _capset(0, 0, 0)


def verify(plan: DropPlan) -> None:
    """Refuse to go on unless every thread shows the promised state, and root cannot be regained."""
    target = plan.target
    for t in thread_creds():
        problems: list[str] = []
        if target is not None:
            if set(t.uids) != {target.uid}:
                problems.append(f"uids {t.uids}")
            if set(t.gids) != {target.gid}:
                problems.append(f"gids {t.gids}")
            if t.groups:
                problems.append(f"supplementary groups {t.groups}")
        if not t.no_new_privs:
            problems.append("no_new_privs not set")
        caps = {"CapInh": t.cap_inh, "CapPrm": t.cap_prm, "CapEff": t.cap_eff, "CapAmb": t.cap_amb}
        problems += [f"{name} {value:016x}" for name, value in caps.items() if value]
        if target is not None and t.tid == os.getpid() and t.cap_bnd:
            problems.append(f"CapBnd {t.cap_bnd:016x}")  # emptied on the main thread only (module doc)
        if problems:
            raise PrivilegeError(f"privilege drop incomplete on thread {t.tid}: " + ", ".join(problems))
    if target is not None:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise PrivilegeError("privilege drop failed: setuid(0) still succeeds")


def thread_creds(proc: Path = Path("/proc/self")) -> list[ThreadCreds]:
    """Every live thread's credentials (a thread that exits meanwhile is skipped)."""
    out: list[ThreadCreds] = []
    for task in sorted((proc / "task").iterdir(), key=lambda p: int(p.name)):
        try:
            text = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out.append(parse_status(int(task.name), text))
    return out


def parse_status(tid: int, text: str) -> ThreadCreds:
    """The privilege lines of a /proc status file."""
    fields = dict(_status_lines(text))

    def ints(key: str) -> tuple[int, ...]:
        return tuple(int(v) for v in fields.get(key, "").split())

    def cap(key: str) -> int:
        return int(fields[key], 16) if key in fields else 0

    return ThreadCreds(
        tid=tid, uids=ints("Uid"), gids=ints("Gid"), groups=ints("Groups"),
        no_new_privs=fields.get("NoNewPrivs", "0").strip() == "1",
        cap_inh=cap("CapInh"), cap_prm=cap("CapPrm"), cap_eff=cap("CapEff"), cap_bnd=cap("CapBnd"),
        cap_amb=cap("CapAmb"),
    )


def _status_lines(text: str) -> Iterator[tuple[str, str]]:
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            yield key, value.strip()


# --- libc ---------------------------------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]


def _prctl(option: int, arg2: int = 0, arg3: int = 0, *, what: str) -> int:
    rc = _libc.prctl(option, arg2, arg3, 0, 0)
    if rc < 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"prctl: cannot {what}: {os.strerror(err)}") from OSError(err, os.strerror(err))
    return int(rc)


def _clear_ambient() -> None:
    try:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, what="clear the ambient capability set")
    except PrivilegeError as e:
        if isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.EINVAL:
            return  # kernel older than 4.3: there is no ambient set to clear
        raise


def _capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread, 64-bit masks."""
    header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"capget failed: {os.strerror(ctypes.get_errno())}")
    lo, hi = data[0], data[1]
    return (
        lo.effective | hi.effective << 32,
        lo.permitted | hi.permitted << 32,
        lo.inheritable | hi.inheritable << 32,
    )


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"capset failed: {os.strerror(ctypes.get_errno())}")


def _drop_bounding_set() -> None:
    for cap in range(_last_cap() + 1):
        _prctl(PR_CAPBSET_DROP, cap, what=f"drop capability {cap} from the bounding set")


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        cap = 0  # no /proc/sys (unusual): probe until the kernel says the number is not a capability
        while _libc.prctl(PR_CAPBSET_READ, cap + 1, 0, 0, 0) >= 0:
            cap += 1
        return cap
