"""Running generated code against its tests in a sandboxed subprocess, and pass@k.

What the sandbox does (and does not do) for each completion:

- a separate ``python -I`` process (no user site, no PYTHON* variables) in a fresh
  temporary directory that is its working directory and ``HOME``, with a minimal
  environment (no credentials or cloud variables are inherited);
- a wall-clock limit (the process group is killed), and resource limits set with
  ``resource.setrlimit`` before the program starts: address space (``memory_mb``), CPU
  seconds, file size (16 MiB), no core dumps;
- no network: when unprivileged user namespaces work (``unshare -rn``), the process runs in
  its own network namespace, which has no interfaces but a down loopback; in every case an
  audit hook (PEP 578) in the child refuses socket creation, subprocesses, ``fork``/``exec``,
  ``os.kill``, ``ctypes`` and writes outside the working directory;
- a program passes only by running to its end: ``sys.exit(0)``, ``exit()`` or
  ``os._exit(0)`` anywhere (in the solution or in a function the tests call) would
  otherwise exit 0 before the asserts ran, a reward hack a model finds quickly, so any
  exit fails.

An audit hook is a tripwire for careless or confused code, not a security boundary
against deliberately hostile code; run untrusted models' code in a container or VM
(gVisor, Firecracker, nsjail) when that matters. See docs/evaluation.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

GUARD = r"""
import os, sys
_root = os.path.realpath(os.getcwd())
_blocked = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
            "os.fork", "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.", "webbrowser.",
            "urllib.Request", "http.client.connect", "ftplib.", "smtplib.", "imaplib.",
            "poplib.", "nntplib.", "telnetlib.")
_writes = ("w", "a", "x", "+")
def _hook(event, args):
    if event.startswith(_blocked):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and len(args) > 1 and isinstance(args[1], str) \
            and any(c in args[1] for c in _writes) and isinstance(args[0], (str, bytes)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if not path.startswith(_root):
            raise PermissionError(f"sandbox: writing {path} is not allowed")
    if event in ("os.remove", "os.rename", "os.rmdir", "shutil.rmtree", "os.chmod"):
        path = os.path.realpath(os.fsdecode(args[0])) if isinstance(args[0], (str, bytes)) else ""
        if not path.startswith(_root):
            raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed")
src = open("program.py", encoding="utf-8").read()
code = compile(src, "program.py", "exec")
def _no_exit(*_a):
    raise SystemExit("os._exit")
os._exit = _no_exit
sys.addaudithook(_hook)
try:
    exec(code, {"__name__": "__main__"})
except SystemExit as e:
    raise SystemExit(f"sandbox: the program exited ({e.code!r}) before its tests finished")
"""


@lru_cache(maxsize=1)
def network_namespace() -> bool:
    """Whether ``unshare -rn`` (a private network namespace, unprivileged) works here."""
    exe = shutil.which("unshare")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _limits(memory_mb: int, cpu_s: int) -> None:
    import resource

    mem = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> tuple[bool, str]:
    """(passed, why) for one program: passed means it ran to its end within the limits."""
    with tempfile.TemporaryDirectory(prefix="raylm-code-") as tmp:
        Path(tmp, "program.py").write_text(program, encoding="utf-8")
        Path(tmp, "guard.py").write_text(GUARD, encoding="utf-8")
        cmd = [sys.executable, "-I", "guard.py"]
        if network_namespace():
            cmd = [shutil.which("unshare") or "unshare", "-rn", *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8", "TMPDIR": tmp}
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=lambda: _limits(memory_mb, int(timeout_s) + 1),
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return False, f"timed out after {timeout_s:g} s"
        if proc.returncode == 0:
            return True, "passed"
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        return False, f"exit {proc.returncode}: {tail[0][:300]}"


def run_programs(
    programs: Sequence[str], timeout_s: float, memory_mb: int, workers: int = 4
) -> list[tuple[bool, str]]:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, timeout_s, memory_mb), programs))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed stably."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


STOPS = {
    "humaneval": ("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
    "mbpp": ("[DONE]",),
}
"""Where a completion ends (lm-eval's ``until`` for each task)."""


def truncate(fmt: str, completion: str) -> str:
    cut = min((i for s in STOPS[fmt] if (i := completion.find(s)) >= 0), default=len(completion))
    return completion[:cut]


def program_of(fmt: str, prompt: str, completion: str, test: str) -> str:
    """HumanEval completes the prompt's function; MBPP's completion is the whole code."""
    body = prompt + completion if fmt == "humaneval" else completion
    return f"{body}\n\n{test}"
