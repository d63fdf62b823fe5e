"""The sandbox against hostile programs: each is contained (scored 0 by the code task, counted by kind), the test
process and the sandbox server survive, nothing outside the sandbox changes, and every run ends in bounded time.

Real programs in the real sandbox server; no mocks. Where the OS gives the server no network namespace the network
test is skipped with the reason (the README's limits say what that leaves open)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest

from nanopost_trl import sandbox
from nanopost_trl.rewards import Correctness, counting_graders
from nanopost_trl.sandbox import Limits, Outcome, Sandbox
from nanopost_trl.tasks import code

LIMITS = Limits(wall_s=1.0, cpu_s=1, memory_mb=256, processes=8, file_mb=1, open_files=32, output_kb=64)
SLACK_S = 2.0  # a contained program's result comes at most this long after its wall-clock limit
PROBLEM = code.CodeProblem("Write add(a, b).", ("assert _same(add(1, 2), 3)", "assert _same(add(-1, 1), 0)"), "add")


@pytest.fixture(scope="module")
def box():
    runner = Sandbox(workers=2, limits=LIMITS)
    yield runner
    runner.close()


@pytest.fixture
def outside(request):
    """A directory outside the world-writable ones (under tests/), 0755 and owned by the test's user, holding a
    0644 canary file and a 0600 secret file; removed after the test."""
    directory = Path(tempfile.mkdtemp(prefix="sandbox-canary-", dir=Path(__file__).parent))
    request.addfinalizer(lambda: shutil.rmtree(directory, ignore_errors=True))
    directory.chmod(0o755)
    (directory / "canary.txt").write_text("canary")
    (directory / "canary.txt").chmod(0o644)
    (directory / "secret.txt").write_text(f"secret-{secrets.token_hex(8)}")
    (directory / "secret.txt").chmod(0o600)
    return directory


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry under `directory`: its content (files), mode, owner and modification time."""
    entries = {}
    for path in [directory, *directory.rglob("*")]:
        status = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        entries[str(path)] = (content, status.st_mode, status.st_uid, status.st_mtime_ns)
    return entries


def sandbox_processes() -> list[int]:
    """Pids of live (not zombie) processes running as one of the sandbox's slot user ids."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            slot_user = entry.name.isdigit() and sandbox.FIRST_UID <= entry.stat().st_uid < sandbox.FIRST_UID + 64
            if slot_user and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return pids


def no_sandbox_processes(within_s: float = 1.0) -> bool:
    """Whether the slot users' processes are all gone within `within_s` (SIGKILLed ones take a moment to exit)."""
    deadline = time.monotonic() + within_s
    while sandbox_processes():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def grade_hostile(box: Sandbox, program: str) -> tuple[float, dict[str, float], float]:
    """The code task's score of `program` as a reply to PROBLEM, the counts by kind, and the seconds it took."""
    instance = code.make_instance(PROBLEM, runner=box, limits=LIMITS)
    start = time.perf_counter()
    with counting_graders() as counts:
        [score] = Correctness()([f"```python\n{program}\n```"], [instance])
    return score, {k: v for k, v in counts.items() if k.startswith("program_") and v}, time.perf_counter() - start


HOSTILE = {
    "infinite_loop": ("while True:\n    pass", "timeout"),
    "sleep_forever": ("import time\ntime.sleep(1000)", "timeout"),
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", "timeout"),
    "memory_hog": ("hog = []\nwhile True:\n    hog.append(bytearray(50_000_000))", "memory"),
    "print_1_gb": ("import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)", "output_limit"),
    "big_file": ("with open('big', 'wb') as f:\n    f.write(b'x' * 2**21)", "file_limit"),
    "ctypes_crash": ("import ctypes\nctypes.string_at(0)", "signal"),
    "kill_everyone": ("import os, signal\nos.kill(-1, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGKILL)", "error"),
    "raise_limits": ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (2**40, 2**40))", "error"),
    "become_root": ("import os\nos.setuid(0)", "error"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained_and_counted(box, name):
    program, kind = HOSTILE[name]
    if name == "kill_everyone" and os.geteuid() != 0:
        pytest.skip("not root: programs run as this user, whose processes kill(-1) would reach (README: limits)")
    box.run("pass")  # the server starts: its isolation is known
    if name == "fork_bomb" and not box.isolation["process_limit"]:
        pytest.skip(f"no process limit here ({box.notes}): a fork bomb would reach the machine (README: limits)")
    score, counts, elapsed = grade_hostile(box, program)
    assert score == 0.0
    assert counts == {f"program_{kind}": 1.0}
    assert elapsed < LIMITS.wall_s + SLACK_S
    assert box.run("print('alive')").stdout == "alive\n"  # the server survived
    if box.isolation.get("separate_user"):
        assert no_sandbox_processes()  # nothing of it still runs (fork bomb children included)


def test_file_size_limit_and_output_cap_are_enforced(box):
    result = box.run("with open('big', 'wb') as f:\n    f.write(b'x' * 2**21)")
    assert result.outcome is Outcome.FILE_LIMIT and result.signal == signal.SIGXFSZ
    result = box.run("import sys\nchunk = 'x' * 2**20\nfor _ in range(1024):\n    sys.stdout.write(chunk)")
    assert result.outcome is Outcome.OUTPUT_LIMIT
    assert len(result.stdout) + len(result.stderr) <= LIMITS.output_kb * 1024


def test_files_outside_the_sandbox_are_unchanged(box, outside):
    canary, before = outside / "canary.txt", snapshot(outside)
    escape = Path(tempfile.gettempdir()) / f"nanopost-escape-{secrets.token_hex(4)}"
    attempts = [
        f"open({str(canary)!r}, 'w').write('owned')",
        f"os.remove({str(canary)!r})",
        f"os.chmod({str(canary)!r}, 0o777)",
        f"open({str(outside / 'new.txt')!r}, 'w').write('x')",
        f"shutil.rmtree({str(outside)!r})",
        f"open({str(escape)!r}, 'w').write('escaped')",
        "open('../sibling.txt', 'w').write('x')",
    ]
    program = "import os, shutil\n" + "".join(f"try:\n    {a}\nexcept OSError as e:\n    print(e)\n" for a in attempts)
    score, counts, _ = grade_hostile(box, program)
    assert score == 0.0 and counts == {"program_failed_tests": 1.0}
    assert snapshot(outside) == before
    assert not escape.exists()  # with a private /tmp it went to the server's tmpfs; else it was deleted after
    if box.isolation.get("separate_user"):
        assert "Permission denied" in box.run(program).stdout


def test_trainer_environment_and_files_are_not_readable(box, outside, monkeypatch):
    token = f"hunter2-{secrets.token_hex(8)}"
    monkeypatch.setenv("NANOPOST_TEST_SECRET", token)  # in the trainer's environment, not the server's
    secret_file = outside / "secret.txt"
    program = (
        "import os\nprint(dict(os.environ))\n"
        f"for path in ('/proc/{os.getpid()}/environ', {str(secret_file)!r}):\n"
        "    try:\n        print(open(path).read())\n    except OSError as e:\n        print(e)\n"
    )
    result = box.run(program)
    assert token not in result.stdout and "NANOPOST_TEST_SECRET" not in result.stdout
    assert eval(result.stdout.splitlines()[0]) == sandbox.SERVER_ENV
    if box.isolation.get("separate_user"):
        assert secret_file.read_text() not in result.stdout
        errors = result.stdout.splitlines()[1:]
        assert "Permission denied" in errors[0]  # the trainer's /proc environ
        # the file: not readable by the slot's user, or not there at all in the sandbox's private /tmp (a checkout
        # under /tmp)
        in_private_tmp = secret_file.is_relative_to("/tmp") and box.isolation.get("private_tmp")
        assert ("No such file" if in_private_tmp else "Permission denied") in errors[1], errors


def test_network_is_unreachable(box):
    box.run("pass")  # the server starts: its isolation is known
    if not box.isolation.get("network"):
        pytest.skip(f"no network namespace here ({box.notes}): programs can open connections (README: limits)")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        result = box.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=0.5).send(b'x')")
        assert result.outcome is Outcome.ERROR and "Network is unreachable" in result.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    score, counts, _ = grade_hostile(box, f"import socket\nsocket.create_connection(('127.0.0.1', {port}))")
    assert score == 0.0 and counts == {"program_error": 1.0}


def test_program_gets_no_stdin_no_inherited_fds_and_an_empty_private_workdir(box):
    program = (
        "import os, stat\nprint(sorted(os.listdir('/proc/self/fd')))\nprint(os.listdir('.'))\n"
        "print(oct(stat.S_IMODE(os.stat('.').st_mode)), os.getcwd())\nprint(input())"
    )
    result = box.run(program)
    fds, listing, mode_and_cwd = result.stdout.splitlines()[:3]
    assert set(eval(fds)) <= {"0", "1", "2", "3"}  # 3: listdir's own handle
    assert eval(listing) == []
    mode, workdir = mode_and_cwd.split()
    assert mode == "0o700"
    assert result.outcome is Outcome.ERROR and "EOFError" in result.stderr
    if box.isolation.get("private_tmp"):
        return  # the working directory lived in the server's private tmpfs: invisible here anyway
    assert not Path(workdir).exists()  # removed after


def test_results_say_how_programs_ended(box):
    cases = {
        "print('hi')": (Outcome.OK, 0, None),
        "import sys\nsys.exit(3)": (Outcome.ERROR, 3, None),
        "raise ValueError('boom')": (Outcome.ERROR, 1, None),
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)": (Outcome.SIGNAL, None, 15),
        "x = bytearray(2**40)": (Outcome.MEMORY, sandbox.EXIT_MEMORY, None),
    }
    results = box.map(list(cases))
    assert [(r.outcome, r.exit_code, r.signal) for r in results] == list(cases.values())
    assert results[0].stdout == "hi\n" and "ValueError: boom" in results[2].stderr


def test_pool_runs_programs_in_parallel(box):
    start = time.perf_counter()
    results = box.map(["import time\ntime.sleep(0.4)"] * 2)
    assert all(r.ok for r in results)
    assert time.perf_counter() - start < 0.75  # two 0.4 s programs at once, not one after the other


def test_server_restarts_after_dying():
    runner = Sandbox(workers=1, limits=LIMITS)
    try:
        assert runner.run("print(1)").ok
        runner._server.kill()
        runner._server.wait()
        assert runner.run("print(2)").stdout == "2\n"
    finally:
        runner.close()


def test_limits_reject_non_positive_values():
    with pytest.raises(ValueError, match="Limits.wall_s must be > 0"):
        Limits(wall_s=0)
