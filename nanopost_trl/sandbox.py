"""A local sandbox that runs untrusted Python programs (what a model wrote) and says how each one ended.

`Sandbox().run(program)` returns a `RunResult`: its `outcome` (ok, error, timeout, memory, output_limit, file_limit,
signal, sandbox_error), exit code or signal, captured stdout/stderr (capped) and duration. `submit` returns a future;
`map` runs many programs in parallel, at most `workers` at once (default: one per core: the trainer waits for the
rewards while its programs run, and `workers` bounds the cores they take).

How it works: a server process (this file, `python -I -S sandbox.py --serve`, started on first use with a scrubbed
environment and stdlib only) forks one child per program. The child, before running a line of the program:
starts a new session (its own process group), reads /dev/null as stdin, writes into two pipes the server reads up
to `Limits.output_kb`, closes every other file descriptor, enters a fresh empty working directory (mode 0700,
removed after), sets its resource limits (CPU seconds, address space, processes, file size, open files, no core
files), and, when the server runs as root, drops to a user id of its own (one per worker slot, no groups), so the
process limit binds, and root's files, other processes and `/proc/<pid>/environ` are closed to it. The server kills
a program at its wall-clock limit or output cap; after every program it kills all processes of the slot's user id
(a process that called `setsid()` to leave its group included) and deletes what that user left in the
world-writable directories.

The server also isolates itself once, at start, where Linux lets it without extra privileges (logged otherwise; not
root, inside a user namespace of its own first): a network namespace of its own (no interface up: no network, loopback
included), and a mount namespace with private tmpfs mounts (size-capped) over the world-writable directories (/tmp,
/var/tmp, /dev/shm, /run/lock), so a program's files there never reach the host's. Forking a ready interpreter instead
of starting one costs less than running the program bare in a new `python` process (benchmarks/sandbox.py).

Limits (README, "The code task and its sandbox"): a program shares the kernel, can read every world-readable file, can
use as much CPU as its limits allow, and can reach Unix sockets on the file system that their permissions open to any
user. Without root there is no separate user id: programs can read the user's files, a process that left its group
outlives its program, and the process limit (inside the user namespace; none without one, as RLIMIT_NPROC would count
all of the user's processes) is `processes` per worker for all programs together. Modules the server did not import
(`PRELOADED_MODULES`) are imported by the program's user id, which may not be able to read them (e.g. a Python under
/root).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import enum
import errno
import json
import logging
import os
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

logger = logging.getLogger(__name__)

FIRST_UID = 61000  # slot k runs as uid/gid FIRST_UID + k (when the server is root); must belong to nobody else
EXIT_MEMORY = 121  # the child's exit code when the program raised MemoryError (its address-space limit)
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # where any user can create files
TMPFS_MB = 256  # size cap of each private tmpfs mount (server with a mount namespace)
SERVER_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}  # the whole environment programs see
# Imported by the server before it forks, so a program can import them whatever the file permissions.
PRELOADED_MODULES = (
    "array", "bisect", "cmath", "collections", "copy", "ctypes", "dataclasses", "datetime", "decimal", "fractions",
    "functools", "hashlib", "heapq", "itertools", "json", "math", "operator", "random", "re", "socket", "statistics",
    "string", "textwrap", "typing", "unicodedata", "encodings.idna",  # idna: socket's host names
)  # fmt: skip
_FRAME = struct.Struct(">I")
# Linux constants (sched.h, prctl.h, mount.h)
CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER = 0x00020000, 0x40000000, 0x10000000
PR_SET_CHILD_SUBREAPER = 36
MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV = 0x4000, 0x40000, 0x2, 0x4


class Outcome(str, enum.Enum):
    """How a program ended."""

    OK = "ok"  # exited 0
    ERROR = "error"  # a non-zero exit: an exception, a failed assert, sys.exit(n)
    TIMEOUT = "timeout"  # killed at its wall-clock limit, or its CPU-seconds limit (SIGXCPU)
    MEMORY = "memory"  # MemoryError at its address-space limit
    OUTPUT_LIMIT = "output_limit"  # killed once stdout + stderr passed the cap
    FILE_LIMIT = "file_limit"  # wrote a file past the file-size limit (SIGXFSZ)
    SIGNAL = "signal"  # killed by another signal (a segfault, an abort, a SIGKILL it sent itself)
    SANDBOX_ERROR = "sandbox_error"  # the sandbox could not run it


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one program."""

    wall_s: float = 5.0  # wall-clock seconds, then the program and all its processes are killed
    cpu_s: int = 5  # CPU seconds (RLIMIT_CPU)
    memory_mb: int = 512  # address space (RLIMIT_AS)
    processes: int = 16  # processes and threads of its user id (RLIMIT_NPROC; not root: of all programs together)
    file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE
    output_kb: int = 256  # stdout + stderr kept; past it the program is killed

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(f"Limits.{field.name} must be > 0, got {getattr(self, field.name)!r}")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one program did. `exit_code` is None when a signal ended it (`signal` then names it)."""

    outcome: Outcome
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


class SandboxError(RuntimeError):
    """The sandbox server could not start or died."""


class Sandbox:
    """Runs programs in the server process (started on first use, restarted if it died); thread-safe.

    `workers`: programs run at once (default: the CPU count). `limits`: the default `Limits` of `run`/`submit`.
    `isolation` (after the first run) says which isolation the server obtained, and `notes` why some is missing.
    """

    def __init__(self, workers: int | None = None, limits: Limits = Limits()) -> None:
        if not sys.platform.startswith("linux"):
            raise SandboxError(f"the sandbox runs on Linux only (fork, namespaces, /proc), not on {sys.platform}")
        self.workers = workers or len(os.sched_getaffinity(0))
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        self.limits = limits
        self.isolation: dict[str, bool] = {}
        self.notes: list[str] = []
        self._lock = threading.Lock()  # the server, the pending futures and the next request id
        self._write_lock = threading.Lock()  # one request at a time on the server's stdin
        self._server: subprocess.Popen | None = None
        self._pending: dict[int, concurrent.futures.Future] = {}  # the current server's requests, by id
        self._next_id = 0

    def submit(self, program: str, limits: Limits | None = None) -> concurrent.futures.Future[RunResult]:
        """Queue `program` (Python source) and return a future of its `RunResult`."""
        future: concurrent.futures.Future[RunResult] = concurrent.futures.Future()
        request = {"program": program, "limits": dataclasses.asdict(limits or self.limits)}
        try:
            with self._lock:
                server, pending = self._running_server(), self._pending
                request["id"] = self._next_id = self._next_id + 1
                pending[request["id"]] = future
            with self._write_lock:  # apart from `_lock`, which the reader needs while a full pipe blocks this write
                _write_frame(server.stdin, request)
        except (OSError, SandboxError) as error:
            with self._lock:
                lost = pending.pop(request["id"], None) if "id" in request else future
            if lost is not None:  # else the reader already answered it (the server died)
                future.set_result(RunResult(Outcome.SANDBOX_ERROR, stderr=f"sandbox unavailable: {error}"))
        return future

    def run(self, program: str, limits: Limits | None = None) -> RunResult:
        return self.submit(program, limits).result()

    def map(self, programs: list[str], limits: Limits | None = None) -> list[RunResult]:
        """Run `programs` in parallel (at most `workers` at once); results in order."""
        return [future.result() for future in [self.submit(program, limits) for program in programs]]

    def close(self) -> None:
        """Stop the server (it kills the programs still running); a later run starts a new one."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.stdin.close()
            server.wait()

    def _running_server(self) -> subprocess.Popen:
        if self._server is not None and self._server.poll() is None:
            return self._server
        command = [sys.executable, "-I", "-S", os.path.abspath(__file__), "--serve", str(self.workers)]
        server = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=SERVER_ENV, close_fds=True, cwd="/"
        )
        hello = _read_frame(server.stdout)
        if hello is None:
            raise SandboxError(f"the sandbox server exited at start (code {server.wait()})")
        self.isolation, self.notes = hello["isolation"], hello["notes"]
        for note in self.notes:
            logger.warning("sandbox: %s", note)
        self._server, self._pending = server, {}
        reader = threading.Thread(
            target=self._read_results, args=(server, self._pending), name="nanopost-sandbox", daemon=True
        )
        reader.start()
        return server

    def _read_results(self, server: subprocess.Popen, pending: dict[int, concurrent.futures.Future]) -> None:
        while (frame := _read_frame(server.stdout)) is not None:
            with self._lock:
                future = pending.pop(frame.pop("id"))
            future.set_result(RunResult(**(frame | {"outcome": Outcome(frame["outcome"])})))
        with self._lock:  # the server is gone: whatever it still ran will not come back
            lost = [pending.pop(i) for i in list(pending)]
        for future in lost:
            future.set_result(RunResult(Outcome.SANDBOX_ERROR, stderr="the sandbox server exited"))


_default: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox() -> Sandbox:
    """The process's shared Sandbox (one worker per core, default limits), stopped at exit."""
    global _default
    with _default_lock:
        if _default is None:
            import atexit

            _default = Sandbox()
            atexit.register(_default.close)
        return _default


def _write_frame(stream: Any, message: dict) -> None:
    data = json.dumps(message).encode()
    stream.write(_FRAME.pack(len(data)) + data)
    stream.flush()


def _read_exactly(stream: Any, size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


def _read_frame(stream: Any) -> dict | None:
    """The next message, or None at end of stream."""
    header = _read_exactly(stream, _FRAME.size)
    data = header and _read_exactly(stream, _FRAME.unpack(header)[0])
    return None if data is None else json.loads(data)


# --- the server: everything below runs in its own process (`python -I -S sandbox.py --serve WORKERS`)


def _libc_call(name: str, *arguments: Any) -> None:
    """Call libc's `name`; raise OSError on failure."""
    function = getattr(ctypes.CDLL(None, use_errno=True), name, None)
    if function is None:
        raise OSError(errno.ENOSYS, f"{name}: not in this C library")
    if function(*arguments) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{name}: {os.strerror(error)}")


def _isolate(root: bool) -> tuple[dict[str, bool], list[str]]:
    """Enter new network and mount namespaces where allowed, with private tmpfs over the world-writable
    directories; what was obtained, and why the rest was not."""
    isolation = {"separate_user": root, "process_limit": root, "network": False, "private_tmp": False}
    notes = [] if root else ["not root: programs run as this user and can read its files"]
    if not root:  # a user namespace (this uid mapped to itself) lets an unprivileged server create the others, and
        uid, gid = os.getuid(), os.getgid()  # RLIMIT_NPROC then counts the processes in it, not all of the user's
        try:
            _libc_call("unshare", CLONE_NEWUSER)
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as file:
                    file.write(text)
            isolation["process_limit"] = True
        except OSError as error:
            notes.append(f"no user namespace ({error}): no process limit (RLIMIT_NPROC would count all your processes)")
    try:
        _libc_call("unshare", CLONE_NEWNET)
        isolation["network"] = True
    except OSError as error:
        notes.append(f"no network namespace ({error}): programs can open network connections")
    try:
        _libc_call("unshare", CLONE_NEWNS)
        _libc_call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)  # nothing below propagates to the host
        for directory in WORLD_WRITABLE:
            if os.path.isdir(directory) and not os.path.islink(directory):
                options = f"size={TMPFS_MB}m,mode=1777".encode()
                _libc_call("mount", b"tmpfs", directory.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options)
        isolation["private_tmp"] = True
    except OSError as error:
        cleanup = "deleted after it" if root else "and after it"
        notes.append(f"no mount namespace ({error}): a program's files in {', '.join(WORLD_WRITABLE)} are visible to "
                     f"others while it runs ({cleanup})")  # fmt: skip
    return isolation, notes


@dataclasses.dataclass
class _Program:
    """A running program, as the server tracks it."""

    request_id: int
    pid: int
    slot: int
    workdir: str
    limits: dict
    deadline: float
    started: float
    output: dict[int, bytearray]  # pipe fd -> bytes read (stdout's fd first)
    open_fds: set[int]  # the pipes not yet at end of file
    output_bytes: int = 0
    kill_reason: Outcome | None = None
    status: os.waitid_result | None = None


class _Server:
    """Forks one child per request, at most `workers` at once; answers each with a RunResult as a dict."""

    def __init__(self, workers: int) -> None:
        self.root = os.geteuid() == 0
        self.isolation, self.notes = _isolate(self.root)
        try:
            _libc_call("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphaned grandchildren are reaped here
        except OSError as error:
            self.notes.append(f"not a child subreaper ({error})")
        self.workers = workers
        self.slots = list(range(workers))
        self.uids = [FIRST_UID + slot for slot in self.slots] if self.root else []
        for uid in self.uids:
            _check_unused_uid(uid)
            self._kill_user(uid)  # leftovers of an earlier server
        self.workdirs = tempfile.mkdtemp(prefix="nanopost-sandbox-")
        self.queue: list[dict] = []
        self.running: dict[int, _Program] = {}  # pid -> program
        self.selector = selectors.DefaultSelector()
        self.requests = bytearray()
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer's Ctrl-C is the trainer's: we stop at its EOF
        self.selector.register(wake_read, selectors.EVENT_READ, "wake")
        self.selector.register(0, selectors.EVENT_READ, "requests")

    def serve(self) -> None:
        _write_frame(sys.stdout.buffer, {"isolation": self.isolation, "notes": self.notes})
        open_input = True
        while open_input or self.running:
            now = time.monotonic()
            for program in self.running.values():
                if program.kill_reason is None and now >= program.deadline:
                    self._kill(program, Outcome.TIMEOUT)
            deadlines = [p.deadline for p in self.running.values() if p.kill_reason is None]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for key, _ in self.selector.select(timeout):
                if key.data == "requests":
                    open_input = self._read_requests()
                elif key.data == "wake":
                    os.read(key.fd, 4096)
                else:
                    self._read_output(key.fd, key.data)
            self._reap()
            self._start_queued()
        shutil.rmtree(self.workdirs, ignore_errors=True)

    def _read_requests(self) -> bool:
        data = os.read(0, 1 << 20)
        if not data:  # the trainer closed the pipe: stop taking requests, kill what runs
            self.selector.unregister(0)
            self.queue.clear()
            for program in self.running.values():
                self._kill(program, Outcome.SANDBOX_ERROR)
            return False
        self.requests += data
        while len(self.requests) >= _FRAME.size:
            size = _FRAME.unpack_from(self.requests)[0]
            if len(self.requests) < _FRAME.size + size:
                break
            self.queue.append(json.loads(self.requests[_FRAME.size : _FRAME.size + size]))
            del self.requests[: _FRAME.size + size]
        return True

    def _start_queued(self) -> None:
        while self.queue and self.slots:
            request, slot = self.queue.pop(0), self.slots.pop(0)
            uid = self.uids[slot] if self.uids else None
            workdir = tempfile.mkdtemp(dir=self.workdirs)
            if uid is not None:
                os.chown(workdir, uid, uid)
            pipes = [os.pipe(), os.pipe()]
            started = time.monotonic()
            pid = os.fork()
            if pid == 0:
                self._child(request["program"], request["limits"], workdir, uid, [w for _, w in pipes])
            limits = request["limits"]
            output = {}
            for read, write in pipes:
                os.close(write)
                os.set_blocking(read, False)
                output[read] = bytearray()
                self.selector.register(read, selectors.EVENT_READ, pid)
            self.running[pid] = _Program(
                request["id"], pid, slot, workdir, limits, started + limits["wall_s"], started, output, set(output)
            )

    def process_limit(self, processes: int) -> int | None:
        """A program's RLIMIT_NPROC: `processes` of its own uid (root); not root, in a user namespace: the count of
        the namespace's processes, so `processes` per worker for all programs together, plus the server."""
        if self.root:
            return processes
        return processes * self.workers + 1 if self.isolation["process_limit"] else None

    def _child(self, program: str, limits: dict, workdir: str, uid: int | None, pipes: list[int]) -> None:
        """In the forked child: confine this process, then run `program`; never returns."""
        code = 1
        try:
            self.queue.clear()  # no other program's source stays reachable from this one
            self.requests.clear()
            self.running.clear()
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGINT, signal.SIGXFSZ):  # Python ignores SIGXFSZ: a file too
                signal.signal(signum, signal.SIG_DFL)  # large then ends the program, as `file_limit`
            os.setsid()
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(pipes[0], 1)
            os.dup2(pipes[1], 2)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            os.chdir(workdir)
            os.umask(0o077)
            _set_limits(limits, self.process_limit(limits["processes"]))
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            code = 0
            exec(compile(program, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        except MemoryError:
            code = EXIT_MEMORY
        except BaseException:  # noqa: B036 -- the program's own error, reported on its stderr
            traceback.print_exc()
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(BaseException):  # a closed or broken pipe: nothing left to say
                    stream.flush()
            os._exit(code & 0xFF)

    def _read_output(self, fd: int, pid: int) -> None:
        program = self.running[pid]
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self.selector.unregister(fd)
            os.close(fd)
            program.open_fds.discard(fd)
            self._finish_if_done(program)
            return
        cap = program.limits["output_kb"] * 1024
        program.output[fd] += data[: max(0, cap - program.output_bytes)]
        program.output_bytes += len(data)
        if program.output_bytes > cap and program.kill_reason is None:
            self._kill(program, Outcome.OUTPUT_LIMIT)

    def _kill(self, program: _Program, reason: Outcome) -> None:
        program.kill_reason = reason
        self._kill_all(program)

    def _kill_all(self, program: _Program) -> None:
        """SIGKILL the program's processes: all of its user id's, else its process group."""
        if self.uids:
            self._kill_user(self.uids[program.slot])
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(program.pid, signal.SIGKILL)

    @staticmethod
    def _kill_user(uid: int) -> None:
        """SIGKILL every process of `uid` (kill(-1) sent as that user reaches all of them, and nothing else)."""
        pid = os.fork()
        if pid == 0:
            try:
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)

    def _reap(self) -> None:
        while True:
            try:
                status = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                return
            if status is None:
                return
            program = self.running.get(status.si_pid)
            if program is not None:
                program.status = status
                self._kill_all(program)  # its leftover processes die now, closing the pipes they held
                self._finish_if_done(program)

    def _finish_if_done(self, program: _Program) -> None:
        if program.status is None or program.open_fds:
            return
        del self.running[program.pid]
        shutil.rmtree(program.workdir, ignore_errors=True)
        if self.uids:
            _remove_files_of(self.uids[program.slot])
        self.slots.append(program.slot)
        stdout, stderr = (bytes(data).decode(errors="replace") for data in program.output.values())
        result = _classify(program.status, program.kill_reason) | {"stdout": stdout, "stderr": stderr}
        result["duration_s"] = time.monotonic() - program.started
        _write_frame(sys.stdout.buffer, {"id": program.request_id, **result})


def _set_limits(limits: dict, processes: int | None) -> None:
    """Soft = hard limits (the program cannot raise them), CPU's hard one second later (SIGXCPU first)."""
    megabyte = 1024 * 1024
    values = {
        resource.RLIMIT_CPU: (limits["cpu_s"], limits["cpu_s"] + 1),
        resource.RLIMIT_AS: (limits["memory_mb"] * megabyte,) * 2,
        resource.RLIMIT_FSIZE: (limits["file_mb"] * megabyte,) * 2,
        resource.RLIMIT_NOFILE: (limits["open_files"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    if processes is not None:
        values[resource.RLIMIT_NPROC] = (processes,) * 2
    for limit, value in values.items():
        resource.setrlimit(limit, value)


def _classify(status: os.waitid_result, kill_reason: Outcome | None) -> dict:
    """The RunResult fields `outcome`, `exit_code`, `signal` of an ended child."""
    if status.si_code == os.CLD_EXITED:
        exit_code, signal_number = status.si_status, None
        outcome = {0: Outcome.OK, EXIT_MEMORY: Outcome.MEMORY}.get(exit_code, Outcome.ERROR)
    else:
        exit_code, signal_number = None, status.si_status
        by_signal = {signal.SIGXCPU: Outcome.TIMEOUT, signal.SIGXFSZ: Outcome.FILE_LIMIT}
        outcome = by_signal.get(signal_number, Outcome.SIGNAL)
    return {"outcome": (kill_reason or outcome).value, "exit_code": exit_code, "signal": signal_number}


def _check_unused_uid(uid: int) -> None:
    import pwd

    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return
    raise SandboxError(f"uid {uid} belongs to user {user.pw_name!r}; the sandbox needs uids of its own (FIRST_UID)")


def _remove_files_of(uid: int) -> None:
    """Delete what `uid` created directly in the world-writable directories (the rest of its files lie below)."""
    for directory in WORLD_WRITABLE:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


def _serve(workers: int) -> None:
    for name in PRELOADED_MODULES:
        __import__(name)
    _Server(workers).serve()


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(int(sys.argv[2]))
