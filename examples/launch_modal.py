"""Run nanopost_trl on Modal serverless A100s; results land in the `nanopost-results` volume.

    modal secret create hf-token HF_TOKEN=hf_your_token
    modal run examples/launch_modal.py --smoke               # 2-step pipeline check, default loss
    modal run --detach examples/launch_modal.py              # sweep: 5 losses x 3 seeds on gsm8k
    modal volume get nanopost-results / ./out/ --force       # download, then: python -m nanopost_trl.analysis out/

The image installs torch, then this project (with the extras below) from the local checkout, so local edits ship.
"""

from __future__ import annotations

from pathlib import Path

import modal

PROJECT_DIR = Path(__file__).resolve().parents[1]
REMOTE_PROJECT_DIR = "/root/nanopost_trl"
EXTRAS = "math"
RESULTS_DIR = "/results"
TASKS = "gsm8k"
DEFAULT_LOSS = "dg"
LOSSES = ["grpo", "dg", "kondo", "pmpo", "maxrl"]
SEEDS = [0, 1, 2]
SMOKE_PRESET = "QWEN_0_5B_SMOKE"
SWEEP_PRESET = "QWEN_1_5B_1xA100"

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("torch")
    .add_local_dir(
        PROJECT_DIR,
        REMOTE_PROJECT_DIR,
        copy=True,  # copied into the image so the pip install below can see it
        ignore=[".git", ".venv", "out", "**/__pycache__", "**/*.egg-info", ".pytest_cache", ".ruff_cache"],
    )
    .run_commands(f"pip install '{REMOTE_PROJECT_DIR}[{EXTRAS}]'")
)
volume = modal.Volume.from_name("nanopost-results", create_if_missing=True)
app = modal.App("nanopost-trl", image=image)


def sweep_runs(smoke: bool) -> list[dict]:
    """The runs the entrypoint launches, as `train` keyword arguments: preset, loss, seed, run_name."""
    if smoke:
        return [{"preset": SMOKE_PRESET, "loss": DEFAULT_LOSS, "seed": 0, "run_name": f"smoke-{DEFAULT_LOSS}-s0"}]
    return [
        {"preset": SWEEP_PRESET, "loss": loss, "seed": seed, "run_name": f"qwen1.5b-{TASKS}-{loss}-s{seed}"}
        for loss in LOSSES
        for seed in SEEDS
    ]


@app.function(
    gpu="A100",
    volumes={RESULTS_DIR: volume},
    secrets=[modal.Secret.from_name("hf-token")],
    timeout=24 * 60 * 60,
)
def train(preset: str, loss: str, seed: int, run_name: str) -> str:
    """One training run on one A100, writing out/{run_name}.jsonl and -config.json to the volume."""
    from nanopost_trl.config import Preset
    from nanopost_trl.losses import Loss
    from nanopost_trl.trainer import Trainer

    cfg = Preset[preset].make(seed=seed, run_name=run_name, out_dir=RESULTS_DIR)
    Trainer(cfg).run(loss_fn=Loss.from_name(loss).make(), tasks=TASKS)
    volume.commit()
    return run_name


@app.local_entrypoint()
def main(smoke: bool = False) -> None:
    runs = sweep_runs(smoke)
    print(f"launching {len(runs)} run(s): {', '.join(r['run_name'] for r in runs)}")
    calls = [(run["run_name"], train.spawn(**run)) for run in runs]  # all submitted up front; survives --detach
    for run_name, call in calls:
        try:
            call.get()
            print(f"{run_name}: done")
        except Exception as e:  # one failed run should not hide the others' results
            print(f"{run_name}: FAILED {e!r}")
