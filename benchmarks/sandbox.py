"""Sandbox cost: 1,000 small correct programs through `nanopost_trl.sandbox` vs each run bare in a new subprocess.

The programs are what the code task runs: each generated problem's reference solution inside its test harness
(cycled to `--programs`). Part 1, one at a time, interleaved in blocks so machine noise hits both alike: the sandbox
(one worker) vs `subprocess.run([python, "-I", "-S", "-c", program])` with output captured (the same interpreter
flags as the sandbox server), and vs plain `python -c program`. Prints the time per program and the ratio (goal: the
sandbox <= 1.10x bare). Part 2: the whole set through `Sandbox.map` with 1 and then 2 workers: programs per second,
and the CPU seconds the server and its programs used per wall second (2.0 = both cores busy); then the same with
`--work` more arithmetic in each program (about 20 ms of CPU at the default), where the programs, not the server's
fork and clean-up, take the time.

    python benchmarks/sandbox.py [--programs 1000] [--block 50] [--work 300000]
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import subprocess
import sys
import time

from nanopost_trl.sandbox import Sandbox
from nanopost_trl.tasks import code

BARE_COMMANDS = {"bare python -I -S": [sys.executable, "-I", "-S", "-c"], "bare python": [sys.executable, "-c"]}


def programs(count: int, work: int = 0) -> list[tuple[str, str, int]]:
    """(program, nonce, number of tests) of `count` reference solutions in their harness, each summing `work` squares
    first."""
    pairs = itertools.islice(itertools.cycle(code.problems("train") + code.problems("test")), count)
    result = []
    for index, (family, constant) in enumerate(pairs):
        problem = code.generated_problem(family, constant)
        solution = code.extract_code(code.reference_solution(family, constant))
        nonce = f"{index:016x}"
        busy = f"sum(i * i for i in range({work}))\n" if work else ""
        result.append((busy + code.harness_program(problem, solution, nonce), nonce, len(problem.tests)))
    return result


def run_bare(command: list[str], program: str) -> str:
    done = subprocess.run([*command, program], capture_output=True, stdin=subprocess.DEVNULL, timeout=30, check=True)
    return done.stdout.decode()


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_at_a_time(items: list[tuple[str, str, int]], block: int) -> dict[str, float]:
    """Seconds per program of each runner, run in interleaved blocks."""
    runner = Sandbox(workers=1)
    runner.run("pass")  # start the server outside the timing
    seconds = {"sandbox": 0.0, **dict.fromkeys(BARE_COMMANDS, 0.0)}
    for start in range(0, len(items), block):
        chunk = items[start : start + block]
        for name in seconds:
            begin = time.perf_counter()
            for program, nonce, tests in chunk:
                stdout = runner.run(program).stdout if name == "sandbox" else run_bare(BARE_COMMANDS[name], program)
                assert code.tests_passed(stdout, nonce, tests) == tests, f"{name}: a correct program failed"
            seconds[name] += time.perf_counter() - begin
    runner.close()
    return {name: total / len(items) for name, total in seconds.items()}


def throughput(items: list[tuple[str, str, int]], workers: int) -> tuple[float, float]:
    """Programs per second through `Sandbox.map`, and CPU seconds used per wall second."""
    runner = Sandbox(workers=workers)
    runner.run("pass")
    runner.close()  # the start-up's CPU is counted (and subtracted) apart
    cpu_before = children_cpu_s()
    runner = Sandbox(workers=workers)
    begin = time.perf_counter()
    results = runner.map([program for program, _, _ in items])
    wall = time.perf_counter() - begin
    runner.close()  # the server exits: its CPU time and its programs' are now counted in RUSAGE_CHILDREN
    for result, (_, nonce, tests) in zip(results, items, strict=True):
        assert code.tests_passed(result.stdout, nonce, tests) == tests, "a correct program failed"
    return len(items) / wall, (children_cpu_s() - cpu_before) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=1000)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--work", type=int, default=300_000)
    args = parser.parse_args()
    items = programs(args.programs)
    per_program = one_at_a_time(items, args.block)
    print(f"{args.programs} programs, one at a time (mean ms per program):")
    for name, seconds in per_program.items():
        print(f"  {name:20s} {1000 * seconds:7.2f} ms   sandbox / this = {per_program['sandbox'] / seconds:.3f}")
    for label, batch in (("task programs", items), (f"+ {args.work} squares each", programs(args.programs, args.work))):
        rates = {workers: throughput(batch, workers) for workers in (1, 2)}
        for workers, (rate, busy) in rates.items():
            print(f"  {label}, Sandbox.map, {workers} worker(s): {rate:7.1f} programs/s, {busy:.2f} CPU-s per wall-s")
        print(f"  {label}, 2 workers / 1 worker throughput: {rates[2][0] / rates[1][0]:.2f}x")
    print(f"  load average at the end: {', '.join(f'{load:.1f}' for load in os.getloadavg())}")


if __name__ == "__main__":
    main()
