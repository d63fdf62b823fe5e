"""The learning signal the embedded default exists to show: a short TINY_CPU run raises held-out greedy accuracy."""

from __future__ import annotations

import pytest

from nanopost_trl.config import Preset
from nanopost_trl.trainer import Trainer


@pytest.mark.slow
def test_short_tiny_run_raises_held_out_accuracy(tmp_path):
    cfg = Preset.TINY_CPU.make(num_steps=100, eval_every=100, seed=0, out_dir=str(tmp_path), run_name="learn")
    summary = Trainer(cfg).run(tasks="addition")  # default loss: GRPO
    before, after = summary.eval_before["addition"], summary.eval_after["addition"]
    assert 0.15 < before < 0.30  # the shipped checkpoint's start: 21.7% on the 1000 held-out prompts
    assert after - before >= 0.08, f"held-out greedy accuracy {before:.1%} -> {after:.1%}"
    assert summary.reward_last > summary.reward_first
