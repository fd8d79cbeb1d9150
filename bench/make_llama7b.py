"""Write a Llama-2-7B-shaped model with random bf16 weights, as sharded safetensors, without holding it in memory.

The config is Llama-2-7B's (hidden 4096, 32 layers, 32 heads, no grouped-query attention, intermediate 11008, vocab
32000, RMSNorm eps 1e-5, untied LM head); ``--layers``, ``--hidden`` etc. shrink it. Weights: normal with std 0.02
(the Llama initialisation) drawn from one seeded ``torch.Generator`` in state-dict order, norms 1; written one
shard at a time (the embeddings, one shard per decoder block, then the final norm and LM head), so memory holds
one block (7B: ~0.4 GB of bf16 plus a float32 matrix being drawn); the folder is about 13.5 GB for the 7B shape.

Tokenizer: the default model's (SmolLM2) has 49,152 tokens, more than Llama-2's 32,000 rows, so its ids would run
past the embedding; instead a byte-level BPE is trained with the ``tokenizers`` library on CPython's pydoc topics
(every topic; the same text each run, so the same tokenizer) up to the vocab size, with <unk>, <s>, </s> as ids
0, 1, 2 as in Llama. Small text gives fewer merges than 32,000: the remaining embedding rows are never used.

    .venv/bin/python bench/make_llama7b.py -o runs/llama7b-random                     # the 7B shape (~13.5 GB)
    .venv/bin/python bench/make_llama7b.py -o /tmp/l2 --layers 2 --hidden 256 --intermediate 688 --heads 4 --vocab 1000
    .venv/bin/weightwise quantize runs/llama7b-random --method gptq --format int4 --group-size 64 -o runs/llama7b-w4
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>"]


def llama_config(layers: int, hidden: int, intermediate: int, heads: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       pad_token_id=None, dtype="bfloat16")


def shard_groups(names: list[str]) -> list[list[str]]:
    """The state dict's names in shards: what comes before the blocks, one shard per block, what comes after."""
    before, blocks, after = [], {}, []
    for name in names:
        found = re.match(r"model\.layers\.(\d+)\.", name)
        if found:
            blocks.setdefault(int(found.group(1)), []).append(name)
        else:
            (after if blocks else before).append(name)
    return [group for group in (before, *(blocks[i] for i in sorted(blocks)), after) if group]


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Norm weights are ones; every other tensor N(0, 0.02²), drawn in float32 and stored as bf16."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def write_weights(config, out: Path, seed: int) -> list[str]:
    """Write the shards and their index; returns the shard file names."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    groups = shard_groups(list(shapes))
    generator = torch.Generator().manual_seed(seed)
    files, weight_map, total = [], {}, 0
    for i, group in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_tensor(name, shapes[name], generator) for name in group}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(group, file))
        files.append(file)
        print(f"{file}: {len(group)} tensors", flush=True)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def train_tokenizer(vocab: int):
    """A byte-level BPE trained on the pydoc topics up to ``vocab`` tokens, <unk>/<s>/</s> first."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([topics[key] for key in sorted(topics)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder to write (must not exist)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.vocab < 256 + len(SPECIALS):
        parser.error(f"--vocab must hold the 256 bytes and {len(SPECIALS)} special tokens: at least {256 + len(SPECIALS)}")
    args.output.mkdir(parents=True, exist_ok=False)
    config = llama_config(args.layers, args.hidden, args.intermediate, args.heads, args.vocab)
    config.save_pretrained(args.output)
    train_tokenizer(args.vocab).save_pretrained(args.output)
    files = write_weights(config, args.output, args.seed)
    print(f"wrote {args.output}: {len(files)} shards")


if __name__ == "__main__":
    main()
