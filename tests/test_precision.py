"""bf16: mixed precision over fp32 master weights by default, bf16 weights only when asked, fp32 where the CPU has no
native bf16 (and the run says so)."""

from __future__ import annotations

import json

import pytest
import torch

from nanopost_trl.config import Preset
from nanopost_trl.models import cpu_has_native_bf16
from nanopost_trl.trainer import Trainer


@pytest.mark.skipif(torch.cuda.is_available() or not cpu_has_native_bf16(), reason="needs a CPU with native bf16")
@pytest.mark.parametrize(("bf16_weights", "dtype"), [(False, "float32"), (True, "bfloat16")])
def test_bf16_keeps_fp32_master_weights_unless_bf16_weights(tmp_path, bf16_weights, dtype):
    cfg = Preset.TINY_SMOKE.make(
        out_dir=str(tmp_path), run_name="p", num_steps=1, save_final_model=False, bf16=True, bf16_weights=bf16_weights
    )
    trainer = Trainer(cfg)
    trainer.run()
    runtime = json.loads((tmp_path / "p-config.json").read_text())["runtime"]
    assert (runtime["dtype"], runtime["mixed_precision"]) == (dtype, "bf16")
    assert next(trainer.grpo_trainer.model.parameters()).dtype == getattr(torch, dtype)


def test_bf16_weights_need_bf16():
    with pytest.raises(ValueError, match="bf16_weights=True needs bf16=True"):
        Preset.TINY_SMOKE.make(bf16_weights=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_a_cpu_without_native_bf16_runs_fp32_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cfg = Preset.TINY_SMOKE.make(out_dir=str(tmp_path), run_name="p", num_steps=1, save_final_model=False, bf16=True)
    with pytest.warns(UserWarning, match="this CPU has no native bf16 .*running in fp32"):
        Trainer(cfg).run()
    record = json.loads((tmp_path / "p-config.json").read_text())
    assert (record["runtime"]["dtype"], record["runtime"]["mixed_precision"]) == ("float32", "no")
    assert record["config"]["bf16"] is False
