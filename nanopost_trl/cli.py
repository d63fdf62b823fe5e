"""The command line (`nanopost-trl`, `python -m nanopost_trl.train`): `--preset NAME --loss dg --tasks gsm8k ...`.

Every TrainConfig field is a flag; the preset supplies defaults, `--config run.yaml` overrides them, flags override
both. TRL's GRPOConfig names (`--num_generations 4`) set the matching field, or say what to use instead. The same
command runs under `accelerate launch --config_file accelerate_configs/<cfg>.yaml -m nanopost_trl.train`.
With no arguments it runs the embedded default (TINY_CPU, GRPO, addition) on CPU.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import typing
from collections.abc import Sequence
from dataclasses import field
from typing import Any

import trl
import yaml
from trl import GRPOConfig, TrlParser

from nanopost_trl import faults, memory
from nanopost_trl.chat_templates import chat_template_text
from nanopost_trl.checkpoints import DiskError
from nanopost_trl.config import TrainConfig
from nanopost_trl.launch import Sharding, micro_batches
from nanopost_trl.losses import Loss, loss_class
from nanopost_trl.models import check_hub_model, check_model
from nanopost_trl.presets import Preset
from nanopost_trl.run_paths import run_to_resume
from nanopost_trl.tasks import get_task_loader, task_names, task_source
from nanopost_trl.tasks.custom import HubDataUnavailable
from nanopost_trl.trl_config import TRL_NAMES, translate_trl_names, trl_meaning
from nanopost_trl.utils import close_match, make_dataclass

USAGE = "nanopost-trl [--preset NAME] [--loss NAME] [--tasks NAME,...] [--config run.yaml] [--FIELD VALUE ...] [--list]"


@dataclasses.dataclass
class RunArgs:
    """What to run, beside the TrainConfig: the preset, the loss and its arguments, the tasks."""

    preset: str = field(default="TINY_CPU", metadata={"help": f"One of: {', '.join(p.name for p in Preset)}."})
    loss: str = field(
        default="grpo",
        metadata={
            "help": f"One of: {', '.join(m.name.lower() for m in Loss)}; or your own, as path/to/my_loss.py:ClassName."
        },
    )
    loss_args: str = field(default="", metadata={"help": "Loss fields as 'eta=0.5,keep_frac=0.3'."})
    tasks: str | None = field(
        default=None, metadata={"help": "Comma-separated task names (default: the preset's task, e.g. addition)."}
    )
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint directory to resume from."})
    list: bool = field(default=False, metadata={"help": "Print presets, losses and tasks, then exit."})
    estimate: bool = field(
        default=False, metadata={"help": "Print the predicted peak memory per process and the verdict, then exit."}
    )
    device_gb: float | None = field(
        default=None,
        metadata={"help": "--estimate: device size in GiB (default: the visible GPU's, else the preset's)."},
    )
    num_processes: int | None = field(
        default=None, metadata={"help": "--estimate: processes (default: this launch's, else the preset's target)."}
    )
    zero_stage: int | None = field(default=None, metadata={"help": "--estimate: DeepSpeed ZeRO stage: 0 (none), 2, 3."})
    fsdp: bool = field(default=False, metadata={"help": "--estimate: FSDP2 (default: whether this launch is FSDP)."})
    prompt_tokens: int = field(default=256, metadata={"help": "--estimate: the longest prompt in tokens."})


def parse_loss_args(text: str) -> dict[str, Any]:
    """'eta=0.5,aggregation=token_mean' -> {'eta': 0.5, 'aggregation': 'token_mean'} (Python literals, else strings)."""
    parsed = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--loss_args item {item!r} is not key=value")
        try:
            parsed[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed[key.strip()] = value.strip()
    return parsed


def preset_name(argv: Sequence[str]) -> str:
    """The preset named on the command line, else in the --config YAML, else TINY_CPU."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.preset:
        return known.preset
    if known.config:
        with open(known.config) as f:
            return (yaml.safe_load(f) or {}).get("preset", "TINY_CPU")
    return "TINY_CPU"


def say(note: str) -> None:
    print(f"nanopost-trl: {note}", file=sys.stderr)


class Parser(TrlParser):
    """TrlParser whose defaults (the preset's, the `--config` YAML's) may use TRL's names (`TRL_NAMES`)."""

    def set_defaults_with_config(self, **settings: Any) -> list[str]:
        translated, notes = translate_trl_names(settings)
        for note in notes:
            say(f"--config: {note}")
        return super().set_defaults_with_config(**translated)


def add_flag(parser: argparse.ArgumentParser, name: str, switch: bool) -> None:
    """`--name VALUE`, absent unless given; a switch may go bare, as `--bf16` does."""
    parser.add_argument(f"--{name}", default=argparse.SUPPRESS, **(dict(nargs="?", const="True") if switch else {}))


def with_our_flag_names(argv: Sequence[str]) -> list[str]:
    """`argv` with TRL's flags (`--num_generations 4`) given as ours (`--responses_per_prompt 4`), saying so; a
    refused TRL flag, or a TRL flag and ours with different values, raise a ValueError (`translate_trl_names`)."""
    field_types = typing.get_type_hints(TrainConfig)
    grpo_types = typing.get_type_hints(GRPOConfig)
    trl_flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    our_flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    run_flags = {run_field.name for run_field in dataclasses.fields(RunArgs)}  # ours (--fsdp: the planner's)
    for trl_name in {*TRL_NAMES, *grpo_types} - run_flags:  # every GRPOConfig name: ours elsewhere, TRL's, refused
        meaning = trl_meaning(trl_name)
        if meaning is not None:
            switch = field_types.get(meaning.field) is bool or grpo_types.get(trl_name) is bool
            add_flag(trl_flags, trl_name, switch=switch or meaning.field is None)
    for name in {meaning.field for meaning in TRL_NAMES.values() if meaning.field is not None}:
        add_flag(our_flags, name, switch=field_types[name] is bool)
    try:
        given, rest = trl_flags.parse_known_args(argv)
        ours = vars(our_flags.parse_known_args(rest)[0])
    except argparse.ArgumentError as error:
        raise ValueError(str(error)) from None
    translated, notes = translate_trl_names({**ours, **vars(given)})
    for note in notes:
        say(note)
    options = [(name, json.dumps(value) if name == "trl_args" else str(value)) for name, value in translated.items()]
    return rest + [item for name, value in options if name not in ours for item in (f"--{name}", value)]


def unknown_argument_hint(name: str, flags: Sequence[str]) -> str:
    """' (did you mean --X?)' for a flag `name` close to one of TRL's names, else to one of ours; else ''."""
    trl_name = close_match(name, TRL_NAMES)
    if trl_name is not None:
        meaning = TRL_NAMES[trl_name]
        means = f"TRL's name for --{meaning.field}" if meaning.field else f"TRL's, not set here: {meaning.why}"
        return f" (did you mean --{trl_name}? {means})"
    close = close_match(name, flags)
    if close:
        return f" (did you mean --{close}?)"
    return f" (neither ours nor an option of TRL {trl.__version__}'s GRPOConfig)"


def parse(argv: Sequence[str]) -> tuple[TrainConfig, RunArgs, TrlParser]:
    parser = Parser(
        (TrainConfig, RunArgs),
        usage=USAGE,
        description=f"{__doc__}\n{listing()}",
        formatter_class=argparse.RawTextHelpFormatter,
        allow_abbrev=False,  # a prefix must not bind to a field: --num_iter is not --num_iterations
    )
    try:
        preset = Preset.from_name(preset_name(argv))
        parser.set_defaults_with_config(**preset.value.config)
        cfg, run_args, unknown = parser.parse_args_and_config(with_our_flag_names(argv), return_remaining_strings=True)
    except (ValueError, TypeError) as error:  # e.g. TrainConfig validation, a refused or conflicting TRL name
        parser.error(str(error))
    flags = [option[2:] for action in parser._actions for option in action.option_strings if option.startswith("--")]
    if unknown:  # every one at once, each with its hint
        hints = [arg + unknown_argument_hint(arg[2:].split("=")[0], flags) for arg in unknown if arg.startswith("--")]
        parser.error(f"unrecognized argument{'s' if len(hints) > 1 else ''}: {'; '.join(hints or unknown)}")
    return cfg, run_args, parser


def listing() -> str:
    """The presets with their hardware, the losses with one line each, the tasks with their source: one screen."""
    presets = [
        f"  {p.name:<20} {p.value.hardware:<18} {p.value.config['model']:<28} "
        f"{p.value.config['prompts_per_step']}x{p.value.config['responses_per_prompt']} completions/step, "
        f"max_new_tokens {p.value.config['max_new_tokens']}"
        for p in Preset
    ]
    losses = [f"  {m.name.lower():<8} {inspect.getmodule(m.value).__doc__.splitlines()[0]}" for m in Loss]
    tasks = [f"  {name:<10} {task_source(name)}" for name in task_names()]
    return "\n".join(
        ["presets (--preset NAME):", *presets]
        + ["losses (--loss NAME --loss_args field=value,...):", *losses]
        + ["tasks (--tasks NAME,NAME):", *tasks]
    )


def estimate_report(cfg: TrainConfig, run_args: RunArgs, uses_reference: bool) -> str:
    """`--estimate`: the memory breakdown and verdict; the device, processes and ZeRO stage default to this launch's
    (a visible GPU, accelerate's environment), else to the preset's target device."""
    target_processes, target_gb, target_stage = Preset.from_name(run_args.preset).value.target or (None, None, 0)
    launch = Sharding.of_this_launch()
    fsdp = run_args.fsdp or launch.fsdp
    default_stage = 0 if fsdp else launch.zero_stage or target_stage
    processes = run_args.num_processes or (launch.num_processes if launch.num_processes > 1 else target_processes or 1)
    device_gb = run_args.device_gb or memory.visible_device_gb() or target_gb
    result = memory.estimate(
        cfg,
        num_processes=processes,
        zero_stage=run_args.zero_stage if run_args.zero_stage is not None else default_stage,
        fsdp=fsdp,
        device_gb=device_gb,
        uses_reference=uses_reference,
        prompt_tokens=run_args.prompt_tokens,
        on_gpu=device_gb is not None,  # a device size means a GPU: TRL's Triton log-prob kernel
    )
    return result.report()


def task_list(run_args: RunArgs) -> list[str]:
    """The task names of `--tasks`, else the preset's task."""
    names = run_args.tasks or Preset.from_name(run_args.preset).value.task
    return [name.strip() for name in names.split(",") if name.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, run_args, parser = parse(argv)
    if run_args.list:
        print(listing())
        return
    tasks = task_list(run_args)
    try:
        loss_fn = make_dataclass(loss_class(run_args.loss), parse_loss_args(run_args.loss_args))
        for name in tasks:
            get_task_loader(name)
        check_model(cfg.model, cfg.gguf_file)  # a bad model name or file fails here, in one line, not mid-start
        if cfg.chat_template is not None:
            chat_template_text(cfg.chat_template)  # likewise an unknown chat template
        if not run_args.estimate:  # the estimate takes its processes from its own flags, and loads no model
            micro_batches(cfg, Sharding.of_this_launch().num_processes)
            check_hub_model(cfg.model)  # a hub id offline: one line now, not a minute of retries
        if run_args.resume == "latest":
            cfg = dataclasses.replace(cfg, run_name=run_to_resume(cfg))
    except (ValueError, TypeError, OSError, ImportError) as error:
        parser.error(str(error))
    if run_args.estimate:
        from nanopost_trl.trainer import fill_from_config

        try:
            print(estimate_report(cfg, run_args, fill_from_config(loss_fn, cfg).uses_reference))
        except ValueError as error:
            parser.error(str(error))
        return
    resume = True if run_args.resume == "latest" else run_args.resume

    from accelerate import PartialState

    from nanopost_trl.trainer import Trainer

    try:
        summary = Trainer(cfg).run(loss_fn=loss_fn, tasks=tasks, resume=resume)
        faults.ignore_signals_once_complete()  # the run is saved: a late SIGTERM lets the process exit normally
    except faults.Preempted as stop:  # the checkpoint is saved: say how to go on, exit with the requeue code
        if PartialState().is_main_process:
            say(f"resume: {faults.resume_command(argv, stop.run_name)}")
        sys.exit(stop.code)
    except faults.LostProcess as error:
        say(f"error: {error}")
        sys.exit(faults.LOST_PROCESS_EXIT_CODE)
    # tasks load before the model; a full disk, no checkpoint to resume: one line, no traceback
    except (HubDataUnavailable, DiskError, FileNotFoundError) as error:
        sys.exit(f"nanopost-trl: error: {error}")

    if PartialState().is_main_process:
        print(summary)


if __name__ == "__main__":
    main()
