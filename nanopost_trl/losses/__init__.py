"""Built-in losses, one file each, and the `Loss` registry: `Loss.DG.make(eta=0.5)`; `loss_class("my_loss.py:MyLoss")`
loads a user's one-file loss as the command line's `--loss` does."""

from __future__ import annotations

import enum
import importlib.util
import sys
from pathlib import Path
from typing import Any

from nanopost_trl import base
from nanopost_trl.losses.cispo import CISPOLoss
from nanopost_trl.losses.dapo import DAPOLoss
from nanopost_trl.losses.dg import DGLoss
from nanopost_trl.losses.frame import TokenLoss
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
            raise ValueError(
                f"unknown loss {name!r}; valid: {', '.join(m.name.lower() for m in cls)}, or a file of your own as "
                "path/to/my_loss.py:ClassName"
            ) from None


def loss_class(spec: str) -> type[base.LossFn]:
    """The LossFn class `spec` names: a built-in ("dapo", case-insensitive) or `path/to/file.py:ClassName`, a
    class defined in a Python file (imported as a module of its own). Fails in one line naming what is wrong."""
    path, colon, class_name = spec.rpartition(":")
    if not colon or not path.endswith(".py"):
        return Loss.from_name(spec).value
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--loss {spec}: no file {file}")
    module_spec = importlib.util.spec_from_file_location(f"nanopost_user_loss_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses look their module up while the file runs
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        raise ValueError(f"--loss {spec}: importing {file} failed: {error!r}") from error
    found = getattr(module, class_name, None)
    if not (isinstance(found, type) and issubclass(found, base.LossFn)):
        defined = sorted(
            name
            for name, value in vars(module).items()
            if isinstance(value, type) and issubclass(value, base.LossFn) and value.__module__ == module.__name__
        )
        what = "not defined" if found is None else f"a {type(found).__name__}, not a nanopost_trl.base.LossFn subclass"
        raise ValueError(
            f"--loss {spec}: {class_name} is {what} in {file} (its LossFn classes: {', '.join(defined) or 'none'})"
        )
    return found


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
    "TokenLoss",
    "VESPOLoss",
    "loss_class",
]
