"""What nanopost_trl needs from TRL, checked at start-up and on the first step, and the TRL options it refuses.

The adapter overrides private `GRPOTrainer` methods (`HOOKS`). A TRL release that renames one, or changes the
arguments we call it with, would break a run mid-training or silently bypass the custom loss, so
`check_trl_hooks` stops at start-up with the supported versions, and `BackpropCheck` verifies on the first training
step that the `LossFn`'s loss is the tensor that is back-propagated (TRL's Liger path, huggingface/trl#7270, is how
that broke before).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Any

import torch
import trl
from packaging.specifiers import SpecifierSet
from packaging.version import Version

SUPPORTED_TRL = ">=1.16,<1.17"  # the TRL versions the test suite covers; pyproject.toml declares the same range

# hook -> (positional arguments, keyword arguments) we call it with (besides self); each must bind to TRL's signature.
HOOKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "_calculate_rewards": (("inputs", "prompts", "completions", "completion_ids_list"), ()),
    "_generate_and_score_completions": (("inputs",), ()),
    "_compute_loss": (("model", "inputs"), ()),
    "_get_per_token_logps_and_entropies": (
        ("model", "input_ids", "attention_mask", "logits_to_keep"),
        ("batch_size", "compute_entropy"),
    ),
    "training_step": (("model", "inputs", "num_items_in_batch"), ()),
}
# TRL module attributes the adapter reads: `trainer.fused_head_tiles` switches `_use_triton`, the fused LM head's
# `compact` test (score the labelled positions only), and its tile width; the kernel's own `_use_triton` decides it.
MODULE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "trl.trainer.utils": (
        "_use_triton",
        "_CHUNKED_LOGPROB_CHUNK_SIZE",
        "add_fused_lm_head",
        "selective_log_softmax",
        "selective_log_softmax_and_entropy",
    ),
    "trl.kernels.chunked_logprob": ("_use_triton",),
}

# GRPOConfig options that TRL applies inside its `_compute_loss`, which a LossFn replaces: a non-default value would be
# silently ignored, so it is refused. (Options the LossFn owns, such as loss_type, epsilon, beta as a coefficient and
# use_bias_correction_kl, are its fields instead; see the README.)
REFUSED_OPTIONS: dict[str, Any] = {
    "top_entropy_quantile": 1.0,
    "delta": None,
    "importance_sampling_level": "token",
    "off_policy_mask_threshold": None,
    "entropy_coef": 0.0,
    "use_adaptive_entropy": False,
    "use_liger_kernel": False,
}


class UnsupportedTRL(RuntimeError):
    """The installed TRL does not provide what the adapter relies on."""


def _supported() -> str:
    return f"nanopost_trl supports trl{SUPPORTED_TRL} (installed: {trl.__version__}); pip install 'trl{SUPPORTED_TRL}'"


def check_trl_hooks(trainer_class: type | None = None) -> None:
    """Raise `UnsupportedTRL` unless every hook in `HOOKS` exists on `trainer_class` (default: TRL's GRPOTrainer) and
    accepts the arguments we call it with. Warn when the hooks fit but TRL is outside the tested range."""
    trainer_class = trainer_class or trl.GRPOTrainer
    for name, (positional, keywords) in HOOKS.items():
        hook = getattr(trainer_class, name, None)
        if not callable(hook):
            raise UnsupportedTRL(
                f"{trainer_class.__name__} has no method {name}, which the adapter overrides; " + _supported()
            )
        try:
            inspect.signature(hook).bind(None, *positional, **dict.fromkeys(keywords))
        except TypeError as error:
            raise UnsupportedTRL(
                f"{trainer_class.__name__}.{name}{inspect.signature(hook)} no longer accepts the arguments the adapter "
                f"passes ({', '.join(positional + keywords)}): {error}; " + _supported()
            ) from None
    for module_name, names in MODULE_ATTRIBUTES.items():
        module = importlib.import_module(module_name)
        for name in names:
            if not hasattr(module, name):
                raise UnsupportedTRL(f"{module_name} has no {name}, which the adapter relies on; " + _supported())
    if Version(trl.__version__) not in SpecifierSet(SUPPORTED_TRL):
        warnings.warn(f"untested TRL version: {_supported()}", stacklevel=2)


def refuse_loss_side_options(trainer: trl.GRPOTrainer) -> None:
    """Raise a ValueError naming each GRPOConfig option in `REFUSED_OPTIONS` set away from its default, and for a
    Mixture-of-Experts model whose router auxiliary loss TRL would add to its own loss."""
    args = trainer.args
    changed = {name: getattr(args, name) for name, default in REFUSED_OPTIONS.items() if getattr(args, name) != default}
    if changed:
        raise ValueError(
            f"GRPOConfig options {changed} act inside TRL's own loss, which a nanopost_trl LossFn replaces; "
            "they would be ignored: implement them in the LossFn instead"
        )
    if trainer.aux_loss_enabled:
        raise ValueError(
            "this Mixture-of-Experts model has a router auxiliary loss, which TRL adds inside its own loss and a "
            "nanopost_trl LossFn would drop: not supported"
        )


def sampler_corrected(logprobs: torch.Tensor, importance_sampling_ratio: torch.Tensor) -> torch.Tensor:
    """`logprobs` with the same values, each token's gradient multiplied by TRL's vLLM importance-sampling ratio
    ((B, T) per token, or (B, 1) per sequence; detached): TRL's `per_token_loss * importance_sampling_ratio` for a
    loss built from per-token log-probs, whatever its formula."""
    detached = logprobs.detach()
    return detached + (logprobs - detached) * importance_sampling_ratio


class BackpropCheck:
    """Verifies once that the loss the LossFn returned is the one back-propagated.

    `watch(loss)` returns the loss with a gradient hook on it (first call only); `verify()` after the first training
    step raises `UnsupportedTRL` if TRL never called our `_compute_loss`, or back-propagated another tensor.
    """

    def __init__(self) -> None:
        self.watched = False
        self.reached = False
        self.done = False

    def watch(self, loss: torch.Tensor) -> torch.Tensor:
        if not self.watched and not self.done and loss.requires_grad:
            self.watched = True
            loss.register_hook(self._mark_reached)
        return loss

    def _mark_reached(self, grad: torch.Tensor) -> None:
        self.reached = True

    def verify(self) -> None:
        if self.done:
            return
        self.done = True
        if not self.watched:
            raise UnsupportedTRL(
                "TRL ran a training step without calling the adapter's _compute_loss, so the LossFn was bypassed; "
                + _supported()
            )
        if not self.reached:
            raise UnsupportedTRL(
                "the LossFn's loss was not the tensor TRL back-propagated (another loss replaced it); " + _supported()
            )


# Warnings that are not the user's concern, by message and by the module that issues them.
KNOWN_WARNINGS: list[tuple[str, type[Warning], str]] = [
    # TRL's `disable_gradient_checkpointing` reads the deprecated property on every generation (trl/models/utils.py).
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
    # ... and with gradient_checkpointing=True, TRL's generation wrapper turns it off and on around every generation
    # (trl/models/utils.py `unwrap_model_for_generation`) through the deprecated transformers names.
    (r"`gradient_checkpointing_(enable|disable)` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
]


def silence_known_warnings() -> None:
    """Ignore exactly the `KNOWN_WARNINGS` (each matched by message, category and issuing module)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
