"""The scoring sandbox's server (run as a script by `ponder.rgscore`, never imported by ponder): a fork-server.

It is started as ``python -I rg_server.py`` (isolated mode: no user site, no PYTHON* variables, no cwd on the
path) in an empty temporary directory, imports reasoning-gym once (1-2 s), tries to leave the network namespace
(Linux, root only), and then answers requests read from stdin — a 4-byte length and a pickled
``{"task", "answer", "entry", "timeout", "memory"}`` written by the ponder process (the trusted side) — with one
JSON line each on stdout: ``{"score": x}``, ``{"error": "<exception name>"}`` or ``{"killed": "<why>"}``.

Every request is scored in a fresh ``fork()``ed child, so nothing one answer does survives into the next (a
persistent worker would let one hostile answer rewrite the scorers for every later call). The child, before it
touches the answer: points stdin/stdout/stderr at /dev/null (it cannot write into the protocol), drops root to
``nobody``, sets resource limits (address space, CPU seconds, file size 0, no new processes, no core files) and
installs an audit hook that refuses processes, sockets, ctypes, signals and opening files for writing. The server
SIGKILLs a child that has not answered within its wall-clock time limit. Audit hooks are not a security boundary
on their own; the parse-only guards in `ponder.rgscore` keep known scorers from evaluating anything but
literals, and this process is the second layer.
"""

import gc
import json
import os
import pickle
import resource
import select
import signal
import struct
import sys
import time

_BLOCKED = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
            "os.remove", "os.unlink", "os.rename", "os.replace", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
            "os.link", "os.symlink", "os.truncate", "os.putenv", "os.unsetenv", "os.setuid", "os.setgid",
            "subprocess.", "pty.", "socket.", "ctypes.", "shutil.", "signal.", "resource.setrlimit",
            "sys.remote_exec", "urllib.", "http.", "ftplib.", "smtplib.", "webbrowser.", "winreg.")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError(f"blocked in the scoring sandbox: {event}")
    if event == "open":
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE_FLAGS):
            raise PermissionError("blocked in the scoring sandbox: opening a file for writing")
    if event == "import" and args[0] in ("ctypes", "_ctypes", "cffi", "_posixsubprocess", "socket", "_socket"):
        raise PermissionError(f"blocked in the scoring sandbox: import {args[0]}")


def _leave_network() -> None:
    """A network namespace of our own (no interfaces but a down loopback): Linux, root only; best effort."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(0x40000000)  # CLONE_NEWNET
    except (OSError, AttributeError):
        pass


def _vm_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _child(fn, req, w: int) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if os.geteuid() == 0:  # nobody: no write access to anything root owns, and RLIMIT_NPROC applies
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        except OSError:
            pass
    timeout = float(req.get("timeout", 5.0))
    limits = ((resource.RLIMIT_AS, _vm_bytes() + int(req.get("memory", 512 << 20))),
              (resource.RLIMIT_CPU, int(timeout) + 1), (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_NPROC, 0),
              (resource.RLIMIT_CORE, 0))
    for which, value in limits:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass
    sys.addaudithook(_audit)
    try:
        res = {"score": float(fn(req["answer"], req["entry"]))}
    except BaseException as e:  # noqa: BLE001 - anything the scorer raises is a failed score, reported by name
        res = {"error": type(e).__name__}
    try:
        os.write(w, json.dumps(res).encode()[:4096])
    finally:
        os._exit(0)


def _score(fn, req) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(fn, req, w)
    os.close(w)
    deadline = time.monotonic() + float(req.get("timeout", 5.0))
    data, why = b"", None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            why = f"time limit {req.get('timeout', 5.0)} s"
            break
        ready, _, _ = select.select([r], [], [], left)
        if ready:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
            if len(data) > 4096:
                why = "oversized reply"
                break
    if why is not None:
        os.kill(pid, signal.SIGKILL)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if why is None and not data and os.WIFSIGNALED(status):
        why = f"signal {os.WTERMSIG(status)}"  # e.g. SIGXCPU or SIGKILL at the CPU limit, SIGSEGV
    if why is not None:
        return {"killed": why}
    try:
        out = json.loads(data.decode())
    except ValueError:
        return {"error": "no reply"}
    return out if isinstance(out, dict) else {"error": "bad reply"}


def main() -> None:
    import reasoning_gym  # noqa: F401 - every child shares the imported modules copy-on-write
    from reasoning_gym.factory import get_score_answer_fn
    _leave_network()
    fns = {}
    gc.freeze()  # keep the imported objects out of the collector: fewer copied pages per fork
    stdin, stdout = sys.stdin.buffer, sys.stdout
    stdout.write(json.dumps({"ready": os.getpid()}) + "\n")
    stdout.flush()
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        req = pickle.loads(stdin.read(struct.unpack(">I", head)[0]))  # from the ponder process (trusted side)
        try:
            if req["task"] not in fns:
                fns[req["task"]] = get_score_answer_fn(req["task"])
            out = _score(fns[req["task"]], req)
        except Exception as e:  # noqa: BLE001 - an unknown task, or a fork/pipe failure: report, keep serving
            out = {"error": f"{type(e).__name__}: {e}"}
        stdout.write(json.dumps(out) + "\n")
        stdout.flush()


if __name__ == "__main__":
    main()
