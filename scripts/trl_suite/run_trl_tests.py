"""Run TRL's own GRPO trainer tests offline on CPU against TRL's GRPOTrainer or nanopost_trl's, and compare outcomes.

The test files are read from a TRL git repository (default: the bare mirror) at run time and written to a temporary
package; nothing of TRL's is stored here. For `--trainer nanopost` the module's `from trl import GRPOConfig,
GRPOTrainer` line is rewritten so `GRPOTrainer` names `nanopost_trl.adapter.NanopostGRPOTrainer` (imported from
`--project`). Hub ids resolve to the stand-ins built by build_stand_ins.py (hf-cache/ and hf-datasets/ next to this
file); harness_conftest.py adds the dataset redirect, a per-test timeout and per-test JSON results.

    python run_trl_tests.py --trainer trl --out results/trl.json
    python run_trl_tests.py --trainer nanopost --out results/nanopost.json -k "test_train and not vlm"
    python run_trl_tests.py --compare results/trl.json results/nanopost.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parent
TEST_FILES = ["tests/__init__.py", "tests/conftest.py", "tests/testing_utils.py", "tests/test_grpo_trainer.py"]
TRL_IMPORT = "from trl import GRPOConfig, GRPOTrainer\n"
TRAINERS = {"trl": None, "nanopost": "nanopost_trl.adapter:NanopostGRPOTrainer"}
# Stand-in model caches built by build_stand_ins.py: "small" cuts the vocabulary to ~2k ids (sampling, whose cost is
# linear in the vocabulary, dominates these tests on CPU); "full" keeps the real 151,936-id Qwen vocabulary that the
# tests with hard-coded token ids (mask_truncated_completions, tools) need.
STAND_IN_CACHES = {"small": "hf-cache-small", "full": "hf-cache"}
# Tests that cannot run on CPU here, deselected by keyword on top of TRL's own skip markers.
CPU_DESELECT = "not vllm and not liger and not bitsandbytes and not TestGRPOTrainerSlow"


def git_show(repo: Path, path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
    ).stdout


def write_test_tree(root: Path, trl_repo: Path, trainer_class: str | None) -> Path:
    """Write TRL's test files under `root/tests/` (GRPOTrainer rebound to `trainer_class`) and the harness conftest."""
    (root / "tests").mkdir(parents=True)
    for path in TEST_FILES:
        text = git_show(trl_repo, path)
        if path.endswith("test_grpo_trainer.py") and trainer_class:
            if TRL_IMPORT not in text:
                raise SystemExit(f"{path}: expected the line {TRL_IMPORT.strip()!r} to rebind GRPOTrainer")
            module, name = trainer_class.split(":")
            text = text.replace(TRL_IMPORT, f"from trl import GRPOConfig\nfrom {module} import {name} as GRPOTrainer\n")
        (root / path).write_text(text)
    (root / "conftest.py").write_text((HARNESS_DIR / "harness_conftest.py").read_text())
    return root / "tests" / "test_grpo_trainer.py"


def read_test_lines(path: Path) -> dict[str, dict]:
    """{test name: {outcome, message, duration}} from the harness conftest's JSON lines."""
    tests = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        tests[record.pop("nodeid").split("::", 1)[1]] = record
    return tests


def load_results(path: Path) -> dict:
    """A results JSON, or the JSON lines of a run still going (or cut short)."""
    if path.suffix != ".jsonl":
        return json.loads(path.read_text())
    tests = read_test_lines(path)
    counts = dict(Counter(record["outcome"] for record in tests.values()))
    return {"trainer_class": f"{path} (partial)", "wall_seconds": 0, "counts": counts, "tests": tests}


def run(args: argparse.Namespace) -> dict:
    trainer_class = args.trainer_class or TRAINERS[args.trainer]
    # one JSON line per finished test, written as the run goes (kept: a cut-short run still says what it did)
    results_path = (args.out or Path(tempfile.mkdtemp()) / "results.json").with_suffix(".jsonl").resolve()
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="trl-harness-") as tmp:
        test_file = write_test_tree(Path(tmp), args.trl_repo, trainer_class)
        env = dict(
            os.environ,
            HF_HOME=str(HARNESS_DIR / STAND_IN_CACHES[args.stand_ins]),
            HF_HUB_CACHE=str(HARNESS_DIR / STAND_IN_CACHES[args.stand_ins] / "hub"),
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            CUDA_VISIBLE_DEVICES="",
            WANDB_MODE="disabled",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS=str(args.threads),
            TRL_HARNESS_DATASETS=str(HARNESS_DIR / "hf-datasets"),
            TRL_HARNESS_TIMEOUT=str(args.timeout),
            TRL_HARNESS_RESULTS=str(results_path),
            PYTHONPATH=os.pathsep.join(filter(None, [str(args.project), os.environ.get("PYTHONPATH")])),
        )
        keyword = CPU_DESELECT if not args.k else f"({CPU_DESELECT}) and ({args.k})"
        command = [
            sys.executable,
            "-m",
            "pytest",
            str(test_file),
            "-p",
            "no:cacheprovider",
            "-q",
            "-rN",
            "--rootdir",
            tmp,
            "-k",
            keyword,
            *args.pytest_args,
        ]
        if args.workers > 1:
            command += ["-n", str(args.workers)]
        print("+", " ".join(command), flush=True)
        start = time.time()
        returncode = subprocess.run(command, cwd=tmp, env=env).returncode
    tests = read_test_lines(results_path)
    return {
        "trainer": args.trainer,
        "trainer_class": trainer_class or "trl:GRPOTrainer",
        "stand_ins": args.stand_ins,
        "keyword": keyword,
        "pytest_returncode": returncode,
        "wall_seconds": round(time.time() - start, 1),
        "counts": dict(Counter(record["outcome"] for record in tests.values())),
        "tests": tests,
    }


def compare(reference_path: Path, candidate_path: Path) -> None:
    """Print both runs' counts, then each test the reference passes and the candidate does not (and vice versa)."""
    reference, candidate = load_results(reference_path), load_results(candidate_path)
    for result in (reference, candidate):
        print(f"{result['trainer_class']:45s} {result['wall_seconds']:7.0f}s  {result['counts']}")
    regressions = {
        name: candidate["tests"].get(name, {"outcome": "not run", "message": ""})
        for name, record in reference["tests"].items()
        if record["outcome"] == "passed" and candidate["tests"].get(name, {}).get("outcome") != "passed"
    }
    print(f"\n{len(regressions)} tests pass with {reference['trainer_class']} but not {candidate['trainer_class']}:")
    for name, record in sorted(regressions.items()):
        print(f"  {record['outcome']:8s} {name}\n           {record['message']}")
    gains = [
        n
        for n, r in candidate["tests"].items()
        if r["outcome"] == "passed" and reference["tests"].get(n, {}).get("outcome") != "passed"
    ]
    if gains:
        print(f"\n{len(gains)} tests pass with {candidate['trainer_class']} but not {reference['trainer_class']}:")
        for name in sorted(gains):
            print(f"  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", choices=sorted(TRAINERS), default="trl")
    parser.add_argument("--trainer-class", help="module:Class to test instead (overrides --trainer's class)")
    parser.add_argument("--stand-ins", choices=sorted(STAND_IN_CACHES), default="small", help="which model cache")
    parser.add_argument("-k", help="pytest -k expression, combined with the CPU deselection")
    parser.add_argument("--out", type=Path, help="write results JSON here")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per test (0: no limit)")
    parser.add_argument("--workers", type=int, default=1, help="pytest-xdist workers (needs pytest-xdist)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the test process(es)")
    parser.add_argument(
        "--trl-repo", type=Path, default=os.environ.get("TRL_REPO"), required="TRL_REPO" not in os.environ,
        help="a git clone of TRL (its tests/ are read at HEAD); default: $TRL_REPO",
    )  # fmt: skip
    parser.add_argument("--project", type=Path, default=HARNESS_DIR.parents[1], help="put first on PYTHONPATH")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("REFERENCE", "CANDIDATE"))
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    result = run(args)
    print(f"\n{result['trainer_class']}: {result['counts']} in {result['wall_seconds']}s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
