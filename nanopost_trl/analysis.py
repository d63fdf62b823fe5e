"""Load run outputs into one tidy DataFrame, summarise and plot them.

    from nanopost_trl import analysis
    df = analysis.load("out")                      # a row per (run, step), config flattened into columns
    completions = analysis.load_completions("out") # a row per sampled completion (step, task, prompt, ...)
    analysis.plot(df, y="reward_mean", hue="loss_name")
    analysis.plot_curves(df, "curves.png")

CLI: `python -m nanopost_trl.analysis out/ [--plot curves.png] [--hue loss_name]`.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from nanopost_trl.run_paths import COMPLETIONS_SUFFIX, run_files
from nanopost_trl.utils import read_rows

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PathLike = str | Path
EVAL_ACCURACY = re.compile(r"eval_.+_accuracy")


def _jsonl_files(paths: PathLike | Sequence[PathLike], completions: bool = False) -> list[Path]:
    """Expand directories (every run log in them, or with `completions` every *-completions.jsonl) and files into a
    deduplicated list of .jsonl paths."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = [
                path for path in sorted(item.glob("*.jsonl")) if path.name.endswith(COMPLETIONS_SUFFIX) == completions
            ]
            if not found:
                raise FileNotFoundError(f"no *{COMPLETIONS_SUFFIX if completions else '.jsonl'} files in {item}")
            files.extend(found)
        elif item.is_file():
            if item.suffix != ".jsonl":
                raise ValueError(f"{item} is not a .jsonl run log")
            if item.name.endswith(COMPLETIONS_SUFFIX) != completions:
                run_log = run_files(item.parent, item.name.removesuffix(COMPLETIONS_SUFFIX))["log"].name
                raise ValueError(
                    f"{item} is a completions file: read it with analysis.load_completions, or pass the run log "
                    f"{run_log}"
                    if not completions
                    else f"{item} is a run log, not a *{COMPLETIONS_SUFFIX} file: read it with analysis.load"
                )
            files.append(item)
        else:
            raise FileNotFoundError(f"no such file or directory: {item}")
    return list({f.resolve(): f for f in files}.values())


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """One dict per step; rows sharing a step (e.g. eval + train) merge, later values win."""
    by_step: dict[Any, dict[str, Any]] = {}
    for row in read_rows(path):
        by_step.setdefault(row["step"], {}).update(row)
    return list(by_step.values())


def _cell(value: Any) -> Any:
    """Make a config value fit one DataFrame cell: lists comma-joined, dicts as JSON, scalars unchanged."""
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _read_config(path: Path) -> dict[str, Any]:
    """Flattened `{run_name}-config.json` next to a run log; {} (with a warning) if missing or unreadable."""
    cfg_path = run_files(path.parent, path.stem)["config"]
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        warnings.warn(f"{path}: no config file {cfg_path.name}; config columns will be missing", stacklevel=3)
        return {}
    except json.JSONDecodeError as e:
        warnings.warn(f"{cfg_path}: unreadable config ({e}); config columns will be missing", stacklevel=3)
        return {}
    flat = {k: _cell(v) for k, v in raw.get("config", {}).items()}
    loss = raw.get("loss", {})
    if "name" in loss:
        flat["loss_name"] = loss["name"]
    if "class" in loss:
        flat["loss_class"] = loss["class"]
    flat.update({f"loss_args.{k}": _cell(v) for k, v in loss.get("args", {}).items()})
    if "tasks" in raw:
        flat["tasks"] = _cell(raw["tasks"])
    flat.update({key: _cell(value) for key, value in raw.get("runtime", {}).items()})
    return flat


def load(paths: PathLike | Sequence[PathLike]) -> pd.DataFrame:
    """Every run under `paths` (directories, .jsonl files, or a list of either) as one DataFrame.

    A row per (run_name, step), sorted; config fields, `loss_name`, `loss_class`, `loss_args.<field>`, `tasks`
    (comma-joined) and the runtime (`num_processes`, `device`, `dtype`, `mixed_precision`, `deepspeed_stage`,
    `fsdp_version`, `lora`) are added as columns. Metric columns win over a config field of the same name.
    """
    frames = []
    for path in _jsonl_files(paths):
        run = pd.DataFrame(_read_rows(path))
        if run.empty:
            continue
        run.insert(0, "run_name", path.stem)
        for key, value in _read_config(path).items():
            if key not in run.columns:
                run[key] = [value] * len(run)
        frames.append(run)
    if not frames:
        return pd.DataFrame(columns=["run_name", "step"])
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["run_name", "step"], kind="stable").reset_index(drop=True)


def load_completions(paths: PathLike | Sequence[PathLike]) -> pd.DataFrame:
    """Every sampled completion under `paths` (directories, or `{run_name}-completions.jsonl` files): a row per
    completion with `run_name`, `step`, `task`, `prompt`, `completion`, `reward`, `advantage`, sorted by run and step.

    E.g. what a run learned to write: `df[df.step == df.step.max()][["prompt", "completion", "reward"]]`.
    """
    frames = []
    for path in _jsonl_files(paths, completions=True):
        run = pd.DataFrame(read_rows(path))
        run.insert(0, "run_name", path.name.removesuffix(COMPLETIONS_SUFFIX))
        frames.append(run)
    columns = ["run_name", "step", "task", "prompt", "completion", "reward", "advantage"]
    if not frames:
        return pd.DataFrame(columns=columns)
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["run_name", "step"], kind="stable").reset_index(drop=True)


def eval_accuracy_columns(df: pd.DataFrame) -> list[str]:
    """The `eval_{task}_accuracy` columns present in df, sorted."""
    return sorted(c for c in df.columns if EVAL_ACCURACY.fullmatch(c))


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per run: optimizer steps logged (with num_iterations > 1 only a generation step has a reward), first/last
    reward_mean and first/last of every eval accuracy."""
    rows = []
    for run_name, run in df.groupby("run_name", sort=True):
        row: dict[str, Any] = {"run": run_name}
        row["steps"] = int(run.loc[run["step"] > 0, "step"].nunique())  # step 0: the start-of-run eval
        for col, short in [("reward_mean", "reward"), *((c, c) for c in eval_accuracy_columns(df))]:
            values = run[col].dropna() if col in run else pd.Series(dtype=float)
            row[f"{short}_first"] = values.iloc[0] if len(values) else float("nan")
            row[f"{short}_last"] = values.iloc[-1] if len(values) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'nanopost_trl[viz]'") from e
    return plt


def plot(
    df: pd.DataFrame,
    y: str = "reward_mean",
    hue: str | None = "loss_name",
    x: str = "step",
    ax: Axes | None = None,
    band: str | None = "std",
) -> Axes:
    """One line per `hue` value: `y` averaged over runs (seeds) at each `x`, with a band.

    band: "std" (mean +- std over runs), "minmax" (min to max over runs) or None. hue=None draws one line.
    """
    if band not in ("std", "minmax", None):
        raise ValueError(f"band must be 'std', 'minmax' or None, got {band!r}")
    missing = [c for c in (x, y, hue) if c is not None and c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the DataFrame; available: {', '.join(map(str, df.columns))}")
    if ax is None:
        _, ax = _pyplot().subplots()
    data = df.dropna(subset=[y])
    groups = data.groupby(hue, dropna=False, sort=True) if hue is not None else [(y, data)]
    for label, group in groups:
        stats = group.groupby(x)[y].agg(["mean", "std", "min", "max"]).fillna({"std": 0.0})
        (line,) = ax.plot(stats.index, stats["mean"], label=str(label))
        if band is not None:
            std = stats["std"]
            lo, hi = (stats["mean"] - std, stats["mean"] + std) if band == "std" else (stats["min"], stats["max"])
            ax.fill_between(stats.index, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(title=hue, fontsize="small")
    return ax


def plot_curves(df: pd.DataFrame, path: PathLike, hue: str | None = "loss_name", band: str | None = "std") -> Figure:
    """Panels for reward_mean, every eval_*_accuracy, response_len_mean and loss_kl_ref (those present), saved."""
    _pyplot()  # clear ImportError if matplotlib is missing
    from matplotlib.figure import Figure

    panels = ["reward_mean", *eval_accuracy_columns(df), "response_len_mean", "loss_kl_ref"]
    panels = [c for c in panels if c in df.columns and df[c].notna().any()]
    if not panels:
        raise ValueError("nothing to plot: none of reward_mean, eval_*_accuracy, response_len_mean, loss_kl_ref")
    fig = Figure(figsize=(4.5 * len(panels), 3.5), layout="constrained")
    for ax, col in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        plot(df, y=col, hue=hue, ax=ax, band=band)
        ax.set_title(col)
    fig.savefig(path, dpi=120)
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Summarise (and plot) nanopost_trl runs.")
    parser.add_argument("paths", nargs="+", help="run directories and/or .jsonl files")
    parser.add_argument("--plot", metavar="PATH", help="write reward/eval/length/KL curves to this image file")
    parser.add_argument("--hue", default="loss_name", help="column that splits the curves (default: loss_name)")
    args = parser.parse_args(argv)
    df = load(args.paths)
    print(summary(df).to_string(index=False, float_format="{:.3f}".format))
    if args.plot:
        plot_curves(df, args.plot, hue=args.hue)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
