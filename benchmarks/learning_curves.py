"""Learning curves of every built-in loss on a preset and task, several seeds each.

Each run is the CLI in its own process (`python -m nanopost_trl.train --preset P --tasks T --loss L --seed S`),
`--jobs` at a time with the cores split between them. Writes a markdown table (held-out greedy accuracy before ->
after, steps to +10 points, the accuracy of the last eval within `--budget_s` seconds of training, train time; mean
over seeds) to stdout and to `--table`, and a PNG of reward and eval accuracy vs step per loss (`--plot`).

    python benchmarks/learning_curves.py --seeds 0 1 2 --jobs 2                      # TINY_CPU, addition
    python benchmarks/learning_curves.py --preset SMOLLM_CPU --task arithmetic --losses grpo dg --jobs 1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from nanopost_trl import analysis
from nanopost_trl.losses import Loss


def run(preset: str, task: str, loss: str, seed: int, out_dir: Path, threads: int, extra: list[str]) -> None:
    """One training run in a subprocess, logging to `{out_dir}/{loss}-s{seed}.jsonl`."""
    run_name = f"{loss}-s{seed}"
    command = [sys.executable, "-m", "nanopost_trl.train", "--preset", preset, "--tasks", task, "--loss", loss]
    command += ["--seed", str(seed), "--run_name", run_name, "--out_dir", str(out_dir), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def steps_to_gain(run: pd.DataFrame, column: str, gain: float) -> float:
    """First step whose held-out accuracy is `gain` above the step-0 value (NaN if never)."""
    evals = run.dropna(subset=[column]).sort_values("step")
    reached = evals[evals[column] >= evals[column].iloc[0] + gain]
    return float(reached["step"].iloc[0]) if len(reached) else float("nan")


def within_budget(run: pd.DataFrame, column: str, budget_s: float) -> float:
    """Held-out accuracy at the last eval whose cumulative train time (generation + learning) is within `budget_s`."""
    run = run.sort_values("step")
    train_s = run["step_time_s"].fillna(0).cumsum()
    evals = run[(train_s <= budget_s) & run[column].notna()]
    return float(evals[column].iloc[-1])


def table(frame: pd.DataFrame, column: str, budget_s: float) -> pd.DataFrame:
    """Per loss, mean over seeds: accuracy before/after/best, gain, the gain within `budget_s` of training (median
    and min over seeds), runs reaching +10 points, train time."""
    rows = []
    for _, run in frame.groupby("run_name"):
        evals = run.dropna(subset=[column]).sort_values("step")
        rows.append(
            {
                "loss": run["loss_name"].iloc[0],
                "seed": run["seed"].iloc[0],
                "before": evals[column].iloc[0],
                "after": evals[column].iloc[-1],
                "best": evals[column].max(),
                "steps_to_+10": steps_to_gain(run, column, 0.10),
                "gain_in_budget": within_budget(run, column, budget_s) - evals[column].iloc[0],
                "train_s": run["step_time_s"].sum(),  # optimizer steps incl. generation; excludes evals
            }
        )
    per_run = pd.DataFrame(rows)
    per_run["gain"] = per_run["after"] - per_run["before"]
    grouped = per_run.groupby("loss", sort=False)
    summary = grouped[["before", "after", "gain", "best", "train_s"]].mean()
    summary["seeds"] = grouped.size()
    summary["gain_min"] = grouped["gain"].min()
    summary[f"gain_in_{budget_s:g}s_median"] = grouped["gain_in_budget"].median()
    summary[f"gain_in_{budget_s:g}s_min"] = grouped["gain_in_budget"].min()
    summary["runs_reaching_+10"] = grouped["steps_to_+10"].apply(lambda s: f"{s.notna().sum()}/{len(s)}")
    summary["median_steps_to_+10"] = grouped["steps_to_+10"].median()
    return summary.reset_index()


def to_markdown(frame: pd.DataFrame) -> str:
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="TINY_CPU")
    parser.add_argument("--task", default="addition")
    parser.add_argument("--budget_s", type=float, default=300.0, help="training seconds for the gain_in_budget column")
    parser.add_argument("--losses", nargs="*", default=[m.name.lower() for m in Loss])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out_dir", type=Path, default=Path("benchmarks/out/learning_curves"))
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/learning_curves.png"))
    parser.add_argument("--table", type=Path, default=Path("benchmarks/out/learning_curves.md"))
    parser.add_argument("--report_only", action="store_true", help="only tabulate and plot the runs in --out_dir")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more flags for every run, after --")
    args = parser.parse_args()
    extra = [flag for flag in args.extra if flag != "--"]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(loss, seed) for seed in args.seeds for loss in args.losses]
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run(args.preset, args.task, *job, args.out_dir, threads, extra), jobs))
    frame = analysis.load(args.out_dir)
    frame = frame[frame["run_name"].isin({f"{loss}-s{seed}" for loss, seed in jobs})]
    last_step = frame.groupby("run_name")["step"].transform("max")
    finished = last_step == frame["num_steps"]
    frame = frame[finished]  # a run still going (or killed) is left out
    if frame.empty:
        sys.exit(f"no finished runs in {args.out_dir}")
    markdown = to_markdown(table(frame, f"eval_{args.task}_accuracy", args.budget_s))
    print(markdown)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(markdown + "\n")
    analysis.plot_curves(frame, args.plot, hue="loss_name")
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
