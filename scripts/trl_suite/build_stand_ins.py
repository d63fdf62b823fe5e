"""Build offline stand-ins for the `trl-internal-testing/*` models and datasets that TRL's GRPO tests load.

The Hub is unreachable here, so this writes:

- tiny random models of the same classes, saved with `save_pretrained` into a Hugging Face hub cache layout
  (`<hf-cache>/models--trl-internal-testing--<name>/snapshots/<hash>/` + `refs/main`), so that
  `from_pretrained("trl-internal-testing/<name>")` resolves with `HF_HUB_CACHE=<hf-cache> HF_HUB_OFFLINE=1`;
- the `trl-internal-testing/zen` dataset configs, built by running the `main()` of TRL's own
  `scripts/generate_zen_dataset.py` (read from the TRL mirror at run time, never copied) with `push_to_hub`
  redirected to local parquet files, plus a README.md whose YAML `configs:` makes
  `load_dataset(<local dir>, <config>, split=...)` work. The harness conftest maps the hub id to that directory.

Tokenizers: borrowed from vocab-only GGUF files of llama.cpp (shipped in the llama-cpp-python sdist, copied to
`vocab/`): `ggml-vocab-qwen2.gguf` is the real Qwen2.5 vocabulary, so the token ids hard-coded in TRL's tool-calling
tests mean what they say. Chat templates come from the installed TRL (`trl/chat_templates/*.jinja`).

Usage: python build_stand_ins.py [--out DIR] [--trl-repo GITDIR] [--only NAME ...]
"""

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parent
DEFAULT_TRL_REPO = os.environ.get("TRL_REPO")  # a git clone of TRL
ORG = "trl-internal-testing"

# llama.cpp's qwen2 vocab names the ids above <|im_end|> "[PAD<id>]"; these are their real Qwen2.5 names (and whether
# they are special). Qwen3 names four more ids on top of them.
QWEN2_5_TOKENS = {
    151646: ("<|object_ref_start|>", True),
    151647: ("<|object_ref_end|>", True),
    151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True),
    151650: ("<|quad_start|>", True),
    151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True),
    151653: ("<|vision_end|>", True),
    151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True),
    151656: ("<|video_pad|>", True),
    151657: ("<tool_call>", False),
    151658: ("</tool_call>", False),
    151659: ("<|fim_prefix|>", False),
    151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False),
    151662: ("<|fim_pad|>", False),
    151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False),
}
# llama.cpp's llama-bpe vocab has Llama 3.0's names for the reserved ids; Llama 3.1/3.2 renamed some of them.
LLAMA3_2_TOKENS = {
    128002: ("<|reserved_special_token_0|>", True),
    128003: ("<|reserved_special_token_1|>", True),
    128004: ("<|finetune_right_pad_id|>", True),
    128005: ("<|reserved_special_token_2|>", True),
    128008: ("<|eom_id|>", True),
    128010: ("<|python_tag|>", True),
    **{index: (f"<|reserved_special_token_{index - 128008}|>", True) for index in range(128011, 128256)},
}
QWEN3_TOKENS = {
    **QWEN2_5_TOKENS,
    151665: ("<tool_response>", False),
    151666: ("</tool_response>", False),
    151667: ("<think>", False),
    151668: ("</think>", False),
}


@dataclass
class StandIn:
    """One tiny model: hub name, transformers config/model class names, config kwargs, tokenizer and template."""

    name: str
    config_class: str
    model_class: str
    config_kwargs: dict
    vocab: str = "qwen2"  # stem of vocab/ggml-vocab-<vocab>.gguf
    chat_template: str | None = "qwen2_5"  # stem of trl/chat_templates/<name>.jinja
    token_names: dict[int, tuple[str, bool]] = field(default_factory=dict)  # id -> (name, special) to restore
    remote_code: bool = False


SMALL = dict(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=32)
SMALL_CLS = dict(SMALL, hidden_size=16, num_labels=1)

STAND_INS = [
    StandIn("tiny-Qwen2ForCausalLM-2.5", "Qwen2Config", "Qwen2ForCausalLM", SMALL, token_names=QWEN2_5_TOKENS),
    StandIn(
        "tiny-Qwen2ForSequenceClassification-2.5",
        "Qwen2Config",
        "Qwen2ForSequenceClassification",
        SMALL_CLS,
        token_names=QWEN2_5_TOKENS,
    ),
    StandIn(
        "tiny-Qwen3ForCausalLM",
        "Qwen3Config",
        "Qwen3ForCausalLM",
        SMALL,
        chat_template="qwen3",
        token_names=QWEN3_TOKENS,
    ),
    StandIn(
        "tiny-Qwen3ForSequenceClassification",
        "Qwen3Config",
        "Qwen3ForSequenceClassification",
        SMALL_CLS,
        chat_template="qwen3",
        token_names=QWEN3_TOKENS,
    ),
    StandIn(
        "tiny-Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
        chat_template="qwen3",
        token_names=QWEN3_TOKENS,
    ),
    StandIn(
        "tiny-LlamaForCausalLM-3.2",
        "LlamaConfig",
        "LlamaForCausalLM",
        SMALL,
        vocab="llama-bpe",
        chat_template="llama3_2",
        token_names=LLAMA3_2_TOKENS,
    ),
    StandIn(
        "tiny-LlamaForSequenceClassification-3.2",
        "LlamaConfig",
        "LlamaForSequenceClassification",
        SMALL_CLS,
        vocab="llama-bpe",
        chat_template="llama3_2",
        token_names=LLAMA3_2_TOKENS,
    ),
    StandIn(
        "tiny-MistralForCausalLM-0.2",
        "MistralConfig",
        "MistralForCausalLM",
        SMALL,
        vocab="llama-spm",
        chat_template=None,
    ),
    StandIn(
        "tiny-Gemma2ForCausalLM", "Gemma2Config", "Gemma2ForCausalLM", dict(SMALL, head_dim=2), chat_template="gemma"
    ),
    StandIn(
        "tiny-Cohere2ForCausalLM",
        "Cohere2Config",
        "Cohere2ForCausalLM",
        dict(SMALL, logit_scale=1.0),
        chat_template="cohere2",
    ),
    StandIn(
        "tiny-GptOssForCausalLM",
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(SMALL, num_local_experts=4, num_experts_per_tok=2),
        chat_template="gptoss",
    ),
    StandIn(
        "tiny-Glm4MoeForCausalLM",
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            SMALL,
            moe_intermediate_size=32,
            head_dim=2,
            n_routed_experts=4,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
        chat_template="glm4moe",
    ),
    StandIn(
        "tiny-NemotronHForCausalLM-nano",
        "NemotronHConfig",
        "NemotronHForCausalLM",
        dict(
            hidden_size=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=32,
            layers_block_type=["mamba", "attention", "moe"],
            mamba_num_heads=8,
            mamba_head_dim=4,
            mamba_n_groups=1,
            ssm_state_size=16,
            mamba_d_conv=4,
            mamba_expand=2,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32,
            use_mamba_kernels=False,
        ),
        chat_template="nemotron_3_nano",
    ),
    StandIn(
        "tiny-RemoteForCausalLM", "Qwen2Config", "Qwen2ForCausalLM", SMALL, token_names=QWEN2_5_TOKENS, remote_code=True
    ),
]

# Remote code for tiny-RemoteForCausalLM: a Qwen2 subclass under its own model_type, loadable only with
# trust_remote_code=True (written by this harness, not taken from TRL).
REMOTE_CONFIGURATION = """from transformers import Qwen2Config


class RemoteConfig(Qwen2Config):
    model_type = "remote"
"""
REMOTE_MODELING = """from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2Model

from .configuration_remote import RemoteConfig


class RemoteModel(Qwen2Model):
    config_class = RemoteConfig


class RemoteForCausalLM(Qwen2ForCausalLM):
    config_class = RemoteConfig


class RemoteForSequenceClassification(Qwen2ForSequenceClassification):
    config_class = RemoteConfig
"""


def trl_chat_template(stem: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{stem}.jinja").read_text()


def rename_tokens(tokenizer_json: dict, token_names: dict[int, tuple[str, bool]]) -> None:
    """Give `token_names`' ids their real names (and special flags) in a tokenizer.json."""
    vocab = tokenizer_json["model"]["vocab"]
    for token in [token for token, index in vocab.items() if index in token_names]:
        del vocab[token]  # all old names out first: a new name may be another id's old one
    for index, (name, _) in token_names.items():
        vocab[name] = index
    for added in tokenizer_json["added_tokens"]:
        if added["id"] in token_names:
            name, special = token_names[added["id"]]
            added.update(content=name, special=special)


def shrink_vocabulary(tokenizer_json: dict, size: int) -> None:
    """Keep a byte-level BPE's first `size` ids (bytes + earliest merges) and its named added tokens, renumbered
    after them; placeholder added tokens ("[PAD<id>]") are dropped. Sampling cost is linear in the vocabulary."""
    model = tokenizer_json["model"]
    added = [token for token in tokenizer_json["added_tokens"] if not token["content"].startswith("[PAD")]
    added_ids = {token["id"] for token in tokenizer_json["added_tokens"]}
    vocab = {token: index for token, index in model["vocab"].items() if index < size and index not in added_ids}
    next_id = max(vocab.values()) + 1
    for token in sorted(added, key=lambda token: token["id"]):
        token["id"], next_id = next_id, next_id + 1
        vocab[token["content"]] = token["id"]
    model["vocab"] = vocab
    model["merges"] = [pair for pair in model["merges"] if all(p in vocab for p in (*pair, "".join(pair)))]
    tokenizer_json["added_tokens"] = added


@functools.cache
def gguf_tokenizer(vocab: str):
    """The tokenizer of llama.cpp's vocab-only `vocab/ggml-vocab-<vocab>.gguf` (converted once per build)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(HARNESS_DIR / "vocab"), gguf_file=f"ggml-vocab-{vocab}.gguf")


def load_vocab_tokenizer(vocab: str, token_names: dict[int, tuple[str, bool]], vocab_size: int):
    """A fast tokenizer converted from llama.cpp's vocab-only GGUF file `vocab/ggml-vocab-<vocab>.gguf`, with the
    placeholder names of `token_names`' ids replaced by their real names, cut to `vocab_size` base ids if > 0."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf_tokenizer(vocab).save_pretrained(tmp)
        tokenizer_json = json.loads((Path(tmp) / "tokenizer.json").read_text())
        rename_tokens(tokenizer_json, token_names)
        if vocab_size:
            shrink_vocabulary(tokenizer_json, vocab_size)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def snapshot_dir(cache: Path, repo_type: str, repo_id: str) -> Path:
    """Fresh `snapshots/<hash>/` folder of `repo_id` in the hub cache, with `refs/main` pointing at it."""
    repo_dir = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    if repo_dir.exists():
        shutil.rmtree(repo_dir)
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    path = repo_dir / "snapshots" / revision
    path.mkdir(parents=True)
    return path


def build_model(stand_in: StandIn, cache: Path, vocab_size: int) -> None:
    import torch
    import transformers

    tokenizer = load_vocab_tokenizer(stand_in.vocab, stand_in.token_names, vocab_size)
    if stand_in.chat_template:
        tokenizer.chat_template = trl_chat_template(stand_in.chat_template)
    if stand_in.name.startswith("tiny-Qwen"):  # Qwen2.5/Qwen3 instruct: eos is <|im_end|>, pad <|endoftext|>
        tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token = "<|im_end|>", "<|endoftext|>", None
    if stand_in.name.startswith("tiny-Llama"):  # Llama 3.2 instruct: eos is <|eot_id|>, no pad token
        tokenizer.eos_token = "<|eot_id|>"
    config_class = getattr(transformers, stand_in.config_class)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if tokenizer.bos_token_id is not None:
        ids["bos_token_id"] = tokenizer.bos_token_id
    config = config_class(vocab_size=len(tokenizer), **ids, **stand_in.config_kwargs)
    if getattr(config, "layer_types", None) and getattr(config, "num_hidden_layers", None):
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    torch.manual_seed(0)
    model = getattr(transformers, stand_in.model_class)(config).to(torch.bfloat16)
    generation_config = transformers.GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, **ids)
    model.generation_config = generation_config
    path = snapshot_dir(cache, "model", f"{ORG}/{stand_in.name}")
    if stand_in.remote_code:
        (path / "configuration_remote.py").write_text(REMOTE_CONFIGURATION)
        (path / "modeling_remote.py").write_text(REMOTE_MODELING)
        model.save_pretrained(path)
        config_json = json.loads((path / "config.json").read_text())
        config_json.update(
            model_type="remote",
            architectures=["RemoteForCausalLM"],
            auto_map={
                "AutoConfig": "configuration_remote.RemoteConfig",
                "AutoModel": "modeling_remote.RemoteModel",
                "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
                "AutoModelForSequenceClassification": "modeling_remote.RemoteForSequenceClassification",
            },
        )
        (path / "config.json").write_text(json.dumps(config_json, indent=2))
    else:
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{ORG}/{stand_in.name}: {stand_in.model_class}, vocab {len(tokenizer)}, {n_params / 1e6:.2f}M params")


def build_zen_datasets(trl_repo: Path, out_dir: Path) -> None:
    """Run `main()` of TRL's scripts/generate_zen_dataset.py with push_to_hub writing parquet files to `out_dir`."""
    from datasets import DatasetDict

    source = subprocess.run(
        ["git", "-C", str(trl_repo), "show", "HEAD:scripts/generate_zen_dataset.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    configs = []

    def push_to_local(self: DatasetDict, repo_id: str, config_name: str = "default", **kwargs) -> None:
        data_files = []
        for split, dataset in self.items():
            dataset.to_parquet(str(out_dir / config_name / f"{split}.parquet"))
            data_files.append({"split": split, "path": f"{config_name}/{split}.parquet"})
        configs.append({"config_name": config_name, "data_files": data_files})

    namespace = {"__name__": "generate_zen_dataset"}
    exec(compile(source, "generate_zen_dataset.py", "exec"), namespace)
    original = DatasetDict.push_to_hub
    DatasetDict.push_to_hub = push_to_local
    try:
        namespace["main"](test_size=0.1, push_to_hub=True, repo_id=f"{ORG}/zen")
    finally:
        DatasetDict.push_to_hub = original
    import yaml

    (out_dir / "README.md").write_text("---\n" + yaml.safe_dump({"configs": configs}, sort_keys=False) + "---\n")
    print(f"{ORG}/zen: {len(configs)} configs -> {out_dir}")


def cache_name(vocab_size: int) -> str:
    return "hf-cache-small" if vocab_size else "hf-cache"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HARNESS_DIR, help="harness dir (hf-cache/, hf-datasets/ go here)")
    parser.add_argument(
        "--trl-repo", type=Path, default=DEFAULT_TRL_REPO, help="a git clone of TRL (default: $TRL_REPO)"
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=0,
        help="keep only the first N base token ids (plus named special tokens): several times faster sampling; "
        "0 keeps the real vocabulary (needed by tests with hard-coded Qwen token ids)",
    )
    parser.add_argument("--cache-name", help="hub cache folder name (default: hf-cache, or hf-cache-small with N)")
    parser.add_argument("--only", nargs="*", help="build only these stand-in names (or 'zen')")
    args = parser.parse_args()
    wanted = set(args.only or [])
    if not wanted or "zen" in wanted:
        build_zen_datasets(args.trl_repo, args.out / "hf-datasets" / ORG / "zen")
    failures = []
    for stand_in in STAND_INS:
        if wanted and stand_in.name not in wanted:
            continue
        try:
            build_model(stand_in, args.out / (args.cache_name or cache_name(args.vocab_size)) / "hub", args.vocab_size)
        except Exception as error:  # a model class the installed transformers lacks must not stop the others
            failures.append(f"{stand_in.name}: {type(error).__name__}: {error}")
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)


if __name__ == "__main__":
    main()
