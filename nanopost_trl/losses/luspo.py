"""LUSPO: GSPO with each sequence's term scaled by its length, removing GSPO's response-length bias.

"Length-Unbiased Sequence Policy Optimization" (arXiv 2602.05261), as TRL 1.16 implements `loss_type="luspo"`:

    J = E[ 1/G sum_i |y_i| min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) ]

i.e. `GSPOLoss` with `aggregation="seq_sum_mean"` (mean over sequences of the masked token sum). The clip range
is GSPO's, as the method modifies GSPO; the paper's own values were not checked (TRL leaves them to the user), nor
its equation numbers (the stored copy we could read is the abstract).
"""

from __future__ import annotations

import dataclasses

from nanopost_trl.losses.gspo import GSPOLoss
from nanopost_trl.losses.ops import Aggregation


@dataclasses.dataclass
class LUSPOLoss(GSPOLoss):
    aggregation: Aggregation = "seq_sum_mean"
