"""The final model's card (`README.md`: base model, loss, tasks, config, held-out accuracy) and its push to the Hub.

`Trainer.run` writes the card into `out/{run_name}/final/` after the final save, and with `push_to_hub=True` uploads
that folder (model or LoRA adapter, tokenizer, card) to `hub_model_id`. HF Trainer's own pushes are off
(`to_grpo_config`): only the final folder is pushed, once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCardData

from nanopost_trl.models import hub_model_id, model_origin
from nanopost_trl.run_log import RunSummary


def saved_weights(config: dict[str, Any]) -> str:
    """What the final folder holds, in words."""
    if not config["lora_r"]:
        return "the full fine-tuned model"
    if config["merge_adapter_on_save"]:
        return f"the model with its LoRA adapter (r={config['lora_r']}) merged into the base weights"
    return f"a LoRA adapter (peft, r={config['lora_r']}, alpha={config['lora_alpha']}); load it on the base model"


def model_card(run_config: dict[str, Any], summary: RunSummary) -> str:
    """The card's text: `run_config` is the record `write_run_config` wrote; `summary` gives the eval figures."""
    config, loss = run_config["config"], run_config["loss"]
    adapter = config["lora_r"] > 0 and not config["merge_adapter_on_save"]
    metadata = ModelCardData(  # base_model: a Hub id only (the Hub links it and flags anything else as invalid)
        base_model=hub_model_id(config["model"], config["gguf_file"]),
        library_name="peft" if adapter else "transformers",
        tags=["nanopost_trl", "trl", "reinforcement-learning", loss["name"]],
    )
    rows = "\n".join(
        f"| {task} | {summary.eval_before.get(task, float('nan')):.1%} | {summary.eval_after[task]:.1%} |"
        for task in sorted(summary.eval_after)
    )
    reward = (
        f"Train reward (mean of the first -> last {summary.reward_window} steps): "
        f"{summary.reward_first:.3f} -> {summary.reward_last:.3f}"
        if summary.reward_first is not None
        else ""
    )
    return f"""---
{metadata.to_yaml()}
---

# {run_config["run_name"]}

RL post-training of `{model_origin(config["model"], config["gguf_file"])}` with nanopost_trl on TRL's GRPOTrainer,
{config["num_steps"]} steps of {config["prompts_per_step"]} prompts x {config["responses_per_prompt"]} responses.
This folder holds {saved_weights(config)}.

## Held-out greedy accuracy (before -> after)

| task | before | after |
|---|---|---|
{rows}

{reward}

## Loss

`{loss["class"]}`

```json
{json.dumps(loss["args"], indent=2, default=str)}
```

## Tasks

{", ".join(run_config["tasks"])}

## Training config

```json
{json.dumps(config, indent=2, default=str)}
```

## Versions

{", ".join(f"{name} {version}" for name, version in run_config["versions"].items())}
"""


def write_model_card(model_dir: Path, run_config_path: Path, summary: RunSummary) -> Path:
    """Write `model_dir/README.md` from the run's config record and summary; return its path."""
    path = Path(model_dir) / "README.md"
    path.write_text(model_card(json.loads(Path(run_config_path).read_text()), summary))
    return path


def push(model_dir: Path, repo_id: str, private: bool) -> None:
    """Create (or reuse) the Hub model repo `repo_id` and upload `model_dir` to it."""
    api = HfApi()
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo.repo_id, folder_path=str(model_dir), commit_message=f"nanopost_trl: {Path(model_dir).parent.name}"
    )
