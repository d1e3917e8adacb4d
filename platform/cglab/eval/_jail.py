"""Launcher that runs ONE untrusted Python program inside fresh Linux namespaces.

Executed as `python -I -S _jail.py SPEC_JSON` by `sandbox.run_program`; it must only import the stdlib.
Process tree (all of it in the launcher's process group, which the host kills on timeout):

    launcher (host pid ns)       unshare(NEWNS|NEWNET|NEWPID|NEWIPC|NEWUTS [|NEWUSER])
      └─ init (pid 1 of the new pid ns): mounts, then waits; when it exits the kernel SIGKILLs every process
         left in the namespace, so nothing the program spawned (fork bombs, daemons, setsid) survives it.
           └─ worker: rlimits, drop to an unprivileged uid, exec python -I prog.py in a private tmpfs.

Exit codes: the worker's own (128+signal when killed), or JAIL_SETUP_FAILED when the jail itself could not
be built (the host then reports a sandbox error, never a pass).
"""

import ctypes
import json
import os
import resource
import signal
import sys

JAIL_SETUP_FAILED = 97

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            raw = line.split()[4]
            points.append(raw.encode().decode("unicode_escape"))  # \040 etc.
    return points


def _build_fs(spec: dict) -> str:
    """Private mount tree: every existing mount read-only, a fresh tmpfs at /tmp holding the work dir and a
    read-only bind of the Python installation (its real home may be unreadable to the sandbox uid)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do below propagates to the host
    for point in _mount_points():
        try:
            _mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        except OSError:
            pass  # a vanished or locked mount: the unprivileged uid still cannot write there
    tmp_size = spec["tmpfs_bytes"]
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_size},mode=1777")
    py_home = "/tmp/.python"
    os.mkdir(py_home, 0o755)
    _mount(spec["python_prefix"], py_home, None, MS_BIND | MS_REC)
    _mount(None, py_home, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    with open(os.path.join(work, "prog.py"), "w") as f:
        f.write(spec["program"])
    if spec["uid"] is not None:
        os.chown(work, spec["uid"], spec["uid"])
        os.chown(os.path.join(work, "prog.py"), spec["uid"], spec["uid"])
    try:  # a /proc of the new pid ns: the program sees only its own processes
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV)
    except OSError:
        pass
    return py_home


def _set_limits(spec: dict) -> None:
    lim = spec["limits"]
    for name, value in (
        ("RLIMIT_AS", lim["memory_bytes"]),
        ("RLIMIT_CPU", lim["cpu_seconds"]),
        ("RLIMIT_FSIZE", lim["file_bytes"]),
        ("RLIMIT_NOFILE", lim["open_files"]),
        ("RLIMIT_NPROC", lim["processes"]),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))


def _drop_to_nested_user() -> None:
    """Without real root we are root only of our own user ns, which owns the mount ns we built: that root
    could undo the read-only remounts. So the program runs one user ns further down as uid 1000: no
    capabilities at all, and no say over mounts owned by the parent namespace."""
    _check(_libc.unshare(CLONE_NEWUSER), "unshare(NEWUSER) nested")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write("1000 0 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write("1000 0 1")
    os.setresgid(1000, 1000, 1000)
    os.setresuid(1000, 1000, 1000)


def _worker(spec: dict, python: str, cwd: str) -> None:
    """In the forked child: limits, privileges, exec. Never returns."""
    try:
        # No setsid: in the degraded mode the host's killpg of the launcher's group is what reaches us.
        if spec["userns"]:
            _drop_to_nested_user()
        elif spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["uid"])
            os.setuid(spec["uid"])  # after this, RLIMIT_NPROC counts this uid's processes only
        _set_limits(spec)
        os.chdir(cwd)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": cwd,
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            "LD_LIBRARY_PATH": os.path.join(os.path.dirname(os.path.dirname(python)), "lib"),
        }
        os.execve(python, [python, "-I", "-B", "prog.py"], env)
    except BaseException as err:  # noqa: BLE001 - report and die without running the program
        os.write(2, f"sandbox: worker setup failed: {err}\n".encode())
        os._exit(JAIL_SETUP_FAILED)


def _init(spec: dict) -> None:
    """pid 1 of the new namespace. Never returns."""
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # launcher killed -> init dies -> ns dies
        if spec["namespaces"]:
            py_home = _build_fs(spec)
            python = os.path.join(py_home, spec["python_rel"])
            cwd = "/tmp/work"
        else:  # degraded: no mount ns; the host prepared a private dir
            python, cwd = spec["python"], spec["workdir"]
        worker = os.fork()
        if worker == 0:
            _worker(spec, python, cwd)
    except BaseException as err:  # noqa: BLE001
        os.write(2, f"sandbox: jail setup failed: {err}\n".encode())
        os._exit(JAIL_SETUP_FAILED)
    code = JAIL_SETUP_FAILED
    while True:  # as pid 1 we also reap orphans re-parented to us
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == worker:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            break
    os._exit(code)


def main() -> None:
    spec = json.loads(sys.argv[1])
    with open(spec["program_file"]) as f:
        spec["program"] = f.read()
    if spec["namespaces"]:
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        if spec["userns"]:
            flags |= CLONE_NEWUSER
        try:
            uid, gid = os.getuid(), os.getgid()
            _check(_libc.unshare(flags), "unshare")
            if spec["userns"]:  # become root of our own user ns (maps to the caller's uid on the host)
                with open("/proc/self/setgroups", "w") as f:
                    f.write("deny")
                with open("/proc/self/uid_map", "w") as f:
                    f.write(f"0 {uid} 1")
                with open("/proc/self/gid_map", "w") as f:
                    f.write(f"0 {gid} 1")
        except OSError as err:
            os.write(2, f"sandbox: jail setup failed: {err}\n".encode())
            os._exit(JAIL_SETUP_FAILED)
    child = os.fork()  # first child after unshare(NEWPID) is pid 1 of the new namespace
    if child == 0:
        _init(spec)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)


if __name__ == "__main__":
    main()
