"""Built-in losses, one file each, and the `Loss` registry: `Loss.DG.make(eta=0.5)`."""

from __future__ import annotations

import enum
from typing import Any

from nanopost_trl import base
from nanopost_trl.losses.cispo import CISPOLoss
from nanopost_trl.losses.dapo import DAPOLoss
from nanopost_trl.losses.dg import DGLoss
from nanopost_trl.losses.grpo import GRPOLoss
from nanopost_trl.losses.gspo import GSPOLoss
from nanopost_trl.losses.kondo import KondoLoss
from nanopost_trl.losses.luspo import LUSPOLoss
from nanopost_trl.losses.maxrl import MaxRLLoss
from nanopost_trl.losses.pmpo import PMPOLoss
from nanopost_trl.losses.sapo import SAPOLoss
from nanopost_trl.losses.surrogate import SurrogateLoss
from nanopost_trl.losses.vespo import VESPOLoss
from nanopost_trl.utils import make_dataclass


class Loss(enum.Enum):
    """Registry of built-in losses; `Loss.GRPO.make(**overrides)` returns a configured instance."""

    GRPO = GRPOLoss
    DG = DGLoss
    KONDO = KondoLoss
    PMPO = PMPOLoss
    MAXRL = MaxRLLoss
    DAPO = DAPOLoss
    GSPO = GSPOLoss
    CISPO = CISPOLoss
    SAPO = SAPOLoss
    LUSPO = LUSPOLoss
    VESPO = VESPOLoss

    def make(self, **overrides: Any) -> base.LossFn:
        return make_dataclass(self.value, overrides)

    @classmethod
    def from_name(cls, name: str) -> Loss:
        """Look a loss up by case-insensitive name ("dg", "GRPO"); unknown names list the valid ones."""
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown loss {name!r}; valid: {', '.join(m.name.lower() for m in cls)}") from None


__all__ = [
    "CISPOLoss",
    "DAPOLoss",
    "DGLoss",
    "GRPOLoss",
    "GSPOLoss",
    "KondoLoss",
    "LUSPOLoss",
    "Loss",
    "MaxRLLoss",
    "PMPOLoss",
    "SAPOLoss",
    "SurrogateLoss",
    "VESPOLoss",
]
