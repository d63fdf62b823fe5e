"""nanopost_trl: paper-style RL post-training on TRL. `from nanopost_trl import GRPOTrainer` is the drop-in for
TRL's (`nanopost_trl.adapter.NanopostGRPOTrainer`), imported on first use so `import nanopost_trl` stays light."""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("GRPOTrainer", "NanopostGRPOTrainer"):
        from nanopost_trl.adapter import NanopostGRPOTrainer

        return NanopostGRPOTrainer
    raise AttributeError(f"module 'nanopost_trl' has no attribute {name!r}")
