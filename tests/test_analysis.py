"""analysis.load / summary / plot / CLI on hand-written run outputs (no trainer needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from nanopost_trl import analysis

matplotlib.use("Agg")

LOSSES = {"grpo": ("GRPOLoss", {"epsilon": 0.2}), "dg": ("DGLoss", {"eta": 1.0, "temps": [0.5, 1.0]})}
SEEDS = (0, 1)
NUM_STEPS = 3


def reward(loss: str, seed: int, step: int) -> float:
    return 0.1 * step + (0.2 if loss == "dg" else 0.0) + 0.01 * seed


def write_run(out: Path, loss: str, seed: int, config: bool = True) -> str:
    """A run as the trainer writes it: eval row at step 0, train rows 1..3, eval row sharing step 3."""
    name = f"{loss}-s{seed}"
    rows: list[dict] = [{"step": 0, "eval_gsm8k_accuracy": 0.1 + 0.01 * seed}]
    for step in range(1, NUM_STEPS + 1):
        rows.append(
            {
                "step": step,
                "reward_mean": reward(loss, seed, step),
                "reward_std": 0.3,
                "response_len_mean": 100.0 + step,
                "loss": 0.5,
                "loss_kl_ref": 0.01 * step,
            }
        )
    rows.append({"step": NUM_STEPS, "eval_gsm8k_accuracy": 0.5 + 0.01 * seed})
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config:
        cls, args = LOSSES[loss]
        meta = {
            "run_name": name,
            "config": {"model": "Qwen/Qwen2.5-0.5B-Instruct", "learning_rate": 1e-6, "seed": seed, "num_steps": 3},
            "loss": {"name": loss, "class": cls, "args": args},
            "tasks": ["gsm8k", "math"],
            "versions": {"torch": "2.8.0", "trl": "1.16.0"},
        }
        (out / f"{name}-config.json").write_text(json.dumps(meta))
    return name


@pytest.fixture
def out(tmp_path: Path) -> Path:
    for loss in LOSSES:
        for seed in SEEDS:
            write_run(tmp_path, loss, seed)
    return tmp_path


def test_load_directory_is_tidy_and_sorted(out: Path) -> None:
    df = analysis.load(out)
    names = sorted(f"{loss}-s{seed}" for loss in LOSSES for seed in SEEDS)
    assert sorted(df["run_name"].unique()) == names
    assert len(df) == len(names) * (NUM_STEPS + 1)  # steps 0..3, one row each
    assert not df.duplicated(["run_name", "step"]).any()
    assert list(df["run_name"]) == sorted(df["run_name"])
    for _, run in df.groupby("run_name"):
        assert list(run["step"]) == list(range(NUM_STEPS + 1))
    row = df[(df.run_name == "dg-s1") & (df.step == 2)].iloc[0]
    assert row["reward_mean"] == pytest.approx(reward("dg", 1, 2))


def test_eval_row_merges_with_train_row_at_same_step(out: Path) -> None:
    df = analysis.load(out).set_index(["run_name", "step"])
    merged = df.loc[("grpo-s1", NUM_STEPS)]
    assert merged["reward_mean"] == pytest.approx(reward("grpo", 1, NUM_STEPS))
    assert merged["eval_gsm8k_accuracy"] == pytest.approx(0.51)
    step0 = df.loc[("grpo-s1", 0)]
    assert step0["eval_gsm8k_accuracy"] == pytest.approx(0.11)
    assert pd.isna(step0["reward_mean"])


def test_later_duplicate_values_win(tmp_path: Path) -> None:
    (tmp_path / "r.jsonl").write_text('{"step": 1, "loss": 1.0, "lr": 0.1}\n{"step": 1, "loss": 2.0}\n')
    with pytest.warns(UserWarning, match="no config file"):
        df = analysis.load(tmp_path / "r.jsonl")
    assert len(df) == 1
    assert df.loc[0, "loss"] == 2.0 and df.loc[0, "lr"] == 0.1


def test_flattened_config_columns(out: Path) -> None:
    df = analysis.load(out)
    row = df[df.run_name == "dg-s1"].iloc[0]
    assert row["learning_rate"] == 1e-6
    assert row["seed"] == 1
    assert row["model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert row["loss_name"] == "dg" and row["loss_class"] == "DGLoss"
    assert row["loss_args.eta"] == 1.0
    assert row["loss_args.temps"] == "0.5,1.0"
    assert row["tasks"] == "gsm8k,math"
    assert pd.isna(df[df.run_name == "grpo-s0"].iloc[0]["loss_args.eta"])  # other loss, other args
    assert "config" not in df.columns and "versions" not in df.columns


def test_load_single_file_and_list(out: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    single = analysis.load(out / "grpo-s0.jsonl")
    assert set(single["run_name"]) == {"grpo-s0"}
    assert len(single) == NUM_STEPS + 1

    other = tmp_path_factory.mktemp("other")
    write_run(other, "grpo", 7)
    both = analysis.load([out / "dg-s0.jsonl", str(other), out / "dg-s0.jsonl"])  # duplicate file counted once
    assert sorted(both["run_name"].unique()) == ["dg-s0", "grpo-s7"]
    assert len(both) == 2 * (NUM_STEPS + 1)


def test_missing_config_warns_and_loads(tmp_path: Path) -> None:
    write_run(tmp_path, "grpo", 0, config=False)
    with pytest.warns(UserWarning, match=r"grpo-s0\.jsonl: no config file"):
        df = analysis.load(tmp_path)
    assert len(df) == NUM_STEPS + 1
    assert "loss_name" not in df.columns


def test_truncated_last_line_warns_and_keeps_rows(out: Path) -> None:
    path = out / "dg-s0.jsonl"
    path.write_text(path.read_text() + '{"step": 4, "reward_me')
    with pytest.warns(UserWarning, match=r"dg-s0\.jsonl:6: skipping corrupt line"):
        df = analysis.load(out)
    run = df[df.run_name == "dg-s0"]
    assert list(run["step"]) == list(range(NUM_STEPS + 1))
    assert run["reward_mean"].iloc[-1] == pytest.approx(reward("dg", 0, NUM_STEPS))


def test_corrupt_middle_line_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "r.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n[1, 2]\n{"step": 2, "loss": 0.5}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = analysis.load(tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("r.jsonl:2: skipping corrupt line" in m for m in messages)
    assert any("r.jsonl:3: skipping line without a 'step'" in m for m in messages)
    assert list(df["step"]) == [1, 2]


def test_load_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        analysis.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl"):
        analysis.load(tmp_path)


def test_summary(out: Path) -> None:
    s = analysis.summary(analysis.load(out)).set_index("run")
    assert s.loc["dg-s1", "steps"] == NUM_STEPS
    assert s.loc["dg-s1", "reward_first"] == pytest.approx(reward("dg", 1, 1))
    assert s.loc["dg-s1", "reward_last"] == pytest.approx(reward("dg", 1, NUM_STEPS))
    assert s.loc["grpo-s0", "eval_gsm8k_accuracy_first"] == pytest.approx(0.1)
    assert s.loc["grpo-s0", "eval_gsm8k_accuracy_last"] == pytest.approx(0.5)


@pytest.mark.parametrize("band", ["std", "minmax", None])
def test_plot_one_line_per_hue_mean_over_seeds(out: Path, band: str | None) -> None:
    df = analysis.load(out)
    ax = analysis.plot(df, y="reward_mean", hue="loss_name", band=band)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["dg", "grpo"]
    x, y = lines["dg"].get_data()
    assert list(x) == [1, 2, 3]  # step 0 has no reward, so it is dropped
    expected = [(reward("dg", 0, s) + reward("dg", 1, s)) / 2 for s in (1, 2, 3)]
    assert list(y) == pytest.approx(expected)
    assert len(ax.collections) == (0 if band is None else 2)
    plt.close("all")


def test_plot_rejects_unknown_column(out: Path) -> None:
    with pytest.raises(ValueError, match="not in the DataFrame"):
        analysis.plot(analysis.load(out), y="nope")


def test_plot_curves_writes_png(out: Path, tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    fig = analysis.plot_curves(analysis.load(out), path)
    assert path.exists() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["reward_mean", "eval_gsm8k_accuracy", "response_len_mean", "loss_kl_ref"]
    assert all(len(ax.get_lines()) == len(LOSSES) for ax in fig.axes)


def test_plot_curves_skips_absent_panels(tmp_path: Path) -> None:
    (tmp_path / "r.jsonl").write_text('{"step": 1, "reward_mean": 0.1}\n{"step": 2, "reward_mean": 0.2}\n')
    with pytest.warns(UserWarning):
        df = analysis.load(tmp_path)
    fig = analysis.plot_curves(df, tmp_path / "c.png", hue="run_name")
    assert [ax.get_title() for ax in fig.axes] == ["reward_mean"]


def test_cli_prints_summary_and_writes_plot(out: Path, tmp_path: Path) -> None:
    png = tmp_path / "cli.png"
    result = subprocess.run(
        [sys.executable, "-m", "nanopost_trl.analysis", str(out), "--plot", str(png), "--hue", "loss_name"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MPLBACKEND": "Agg"},
        cwd=Path(__file__).resolve().parents[1],
    )
    lines = result.stdout.splitlines()
    header = lines[0].split()
    assert header[:4] == ["run", "steps", "reward_first", "reward_last"]
    assert "eval_gsm8k_accuracy_last" in header
    body = {line.split()[0]: line.split() for line in lines[1:5]}
    assert sorted(body) == ["dg-s0", "dg-s1", "grpo-s0", "grpo-s1"]
    assert body["dg-s1"][1:4] == ["3", f"{reward('dg', 1, 1):.3f}", f"{reward('dg', 1, 3):.3f}"]
    assert png.exists() and png.stat().st_size > 0
