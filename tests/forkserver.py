"""`python -m MODULE ARGS` (or `python -c CODE ARGS`) many times without paying for MODULE's imports each time.

A training run of the tiny test models takes a few seconds; importing torch, transformers,
DeepSpeed and the trainer takes about ten on 2 cores. The end-to-end tests start dozens of
single-process runs, so a server process imports those modules once and forks one child per
run. The child takes the run's environment, working folder, stdout/stderr files and argv, and
runs MODULE as `__main__` through the same runpy entry that `python -m` uses, then exits as an
interpreter does (threads joined, atexit handlers run). It is a real process: its exit status,
signals (SIGTERM handlers, SIGKILL) and DataLoader workers behave as for a fresh interpreter.

The server forks only while it runs no Python thread but the main one (checked before every
fork) and never runs a torch op itself. Launchers (`deepspeed`, torchrun) and tests that check what a fresh process
imports keep starting fresh interpreters.

    server = ForkServer(["xfast.training.trainer"], env=...)   # imports once
    done = server.run("xfast.train", ["--cfg", path], cwd=..., env=...)   # a CompletedProcess
    child = server.start(...); child.pid; child.poll(); child.wait(timeout)

Protocol (one JSON object per line): {"op": "start", ...} -> {"pid"}, {"op": "poll"/"wait",
"pid"} -> {"returncode"} (negative: killed by that signal, as subprocess reports it).
"""
from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _status(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _child(request: dict) -> None:
    """In a child forked by the server: become `python -m MODULE ARGV` (or `python -c CODE ARGV`)
    and exit with its status."""
    opened = [os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
              os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)]
    if request.get("new_session"):
        os.setsid()  # its own process group, as Popen(start_new_session=True): killpg reaches its children
    _become(request["module"], request["argv"], request["cwd"], request["env"], *opened, code=request.get("code"))


def _become(module: str | None, argv: list[str], cwd: str, env: dict, stdout_fd: int, stderr_fd: int,
            code: str | None = None) -> None:
    """In a forked child: run `python -m MODULE ARGV` (module None: `python -c CODE ARGV`) in `cwd`
    with exactly `env` and these output descriptors, then exit with its status (never returns)."""
    status = 1
    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        devnull = os.open(os.devnull, os.O_RDONLY)
        for source, target in ((devnull, 0), (stdout_fd, 1), (stderr_fd, 2)):
            os.dup2(source, target)
        for fd in {devnull, stdout_fd, stderr_fd} - {0, 1, 2}:
            os.close(fd)
        sys.stdin = open(0, closefd=False)  # the parent's stdin may have been a request pipe
        sys.argv = ["-m" if code is None else "-c", *argv]
        import runpy
        try:
            if code is None:
                runpy._run_module_as_main(module)  # what `python -m MODULE` calls
            else:  # what `python -c CODE` does: CODE runs as __main__, the working folder first on sys.path
                sys.path.insert(0, "")
                exec(compile(code, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
            status = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                status = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                status = 1
        # The interpreter's own exit sequence: join non-daemon threads, run atexit handlers
        # (multiprocessing's terminates DataLoader workers).
        threading._shutdown()
        import atexit
        atexit._run_exitfuncs()
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)


def _fork_check() -> str | None:
    """Why forking this process now is unsafe, or None. Only the main Python thread may exist
    (a lock held by another Python thread would stay held in the child). Native BLAS pools (numpy's
    and scipy's OpenBLAS start idle workers at import) restart in the child through their own
    pthread_atfork handlers, as in DataLoader's forked workers."""
    threads = threading.enumerate()
    if len(threads) != 1:
        return f"this process runs Python threads {[t.name for t in threads]}: a fork is unsafe"
    return None


def call(command: list[str], *, stdout, stderr, env: dict[str, str], cwd: str | None = None) -> int:
    """subprocess.call for `[sys.executable, "-m", MODULE, *ARGV]` that forks this process instead
    of starting a fresh interpreter: MODULE's imports already done here are not paid again. The
    child stays in this process group (a killpg of the caller's group reaches it) and is waited
    for as subprocess.call waits (exit status, negative when killed by a signal). `stdout` is a
    file (object or descriptor), `stderr` one as well or subprocess.STDOUT. Used by `xfast study`
    through its XFAST_STUDY_CALL hook (xfast/study/runner.py)."""
    if command[:2] != [sys.executable, "-m"] or len(command) < 3:
        raise ValueError(f"forkserver.call runs `{sys.executable} -m MODULE ...`, not {command}")
    unsafe = _fork_check()
    if unsafe:
        raise RuntimeError(unsafe)
    out = stdout if isinstance(stdout, int) else stdout.fileno()
    err = out if stderr == subprocess.STDOUT else (stderr if isinstance(stderr, int) else stderr.fileno())
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _become(command[2], command[3:], cwd or os.getcwd(), env, out, err)
    return _status(os.waitpid(pid, 0)[1])


def serve(preload: list[str]) -> None:
    for name in preload:
        importlib.import_module(name)
    requests, replies = sys.stdin, sys.stdout
    children: dict[int, int | None] = {}
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in requests:
        request = json.loads(line)
        op = request["op"]
        if op == "start":
            unsafe = _fork_check()
            if unsafe:
                reply = {"error": unsafe}
            else:
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(request)
                children[pid] = None
                reply = {"pid": pid}
        elif op in ("poll", "wait"):
            pid = request["pid"]
            if children[pid] is None:
                done, status = os.waitpid(pid, 0 if op == "wait" else os.WNOHANG)
                if done:
                    children[pid] = _status(status)
            reply = {"returncode": children[pid]}
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(json.dumps(reply), file=replies, flush=True)


class Child:
    """A run started by the server: pid, poll(), wait(timeout) like subprocess.Popen."""

    def __init__(self, server: ForkServer, pid: int, args: list[str], stdout: Path, stderr: Path):
        self.server, self.pid, self.args = server, pid, args
        self.stdout_path, self.stderr_path = stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server._ask({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def result(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Waits (killing the child after `timeout` s) and returns its exit status and output."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        finally:
            stdout, stderr = self.stdout_path.read_text(), self.stderr_path.read_text()
            self.stdout_path.unlink()
            self.stderr_path.unlink()
        return subprocess.CompletedProcess(self.args, self.returncode, stdout, stderr)


class ForkServer:
    def __init__(self, preload: list[str], env: dict[str, str], timeout: float = 300.0):
        """Starts the server with `env` and imports `preload` in it (waits up to `timeout` s)."""
        self.env = env
        self.process = subprocess.Popen([sys.executable, "-m", "tests.forkserver", *preload], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=Path(__file__).resolve().parent.parent)
        self._read(timeout)

    def _read(self, timeout: float | None = None) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"the fork server did not answer within {timeout} s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server exited (status {self.process.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def start(self, module: str | None, argv: list[str], *, cwd: Path, env: dict[str, str],
              new_session: bool = False, code: str | None = None) -> Child:
        """Starts `python -m module argv` (module None: `python -c code argv`) in `cwd` with exactly
        `env` as its environment (in a new session and process group with new_session, as
        Popen's start_new_session)."""
        out = [Path(tempfile.mkstemp(prefix="forkserver_", suffix=suffix)[1]) for suffix in (".out", ".err")]
        pid = self._ask({"op": "start", "module": module, "code": code, "argv": [str(a) for a in argv],
                         "cwd": str(cwd), "env": env, "stdout": str(out[0]), "stderr": str(out[1]),
                         "new_session": new_session})["pid"]
        args = [sys.executable, "-m", module] if code is None else [sys.executable, "-c", code]
        return Child(self, pid, [*args, *argv], *out)

    def run(self, module: str, argv: list[str], *, cwd: Path, env: dict[str, str],
            timeout: float | None = None) -> subprocess.CompletedProcess:
        return self.start(module, argv, cwd=cwd, env=env).result(timeout)

    def run_code(self, code: str, argv: list[str], *, cwd: Path, env: dict[str, str],
                 timeout: float | None = None) -> subprocess.CompletedProcess:
        """`python -c code argv`, forked: for probes that need a process of their own (a Trainer
        sets process-wide state) but not a fresh interpreter's imports."""
        return self.start(None, argv, cwd=cwd, env=env, code=code).result(timeout)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


if __name__ == "__main__":
    serve(sys.argv[1:])
