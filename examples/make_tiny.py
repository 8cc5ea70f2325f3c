"""Make the tiny, fully local example: a 2-layer Llama, its BPE tokenizer and a learnable chat data set.

Nothing is downloaded: the tokenizer is trained here with the `tokenizers` library on the synthetic
data, and the model is randomly initialised. Everything is seeded, so running the script again gives
the same files (the committed copies are what the tests and the README use).

    python examples/make_tiny.py            # writes examples/tiny-llama and examples/data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234

# ChatML with the BOS the template itself writes (so no tokenizer post-processor adds a second one) and
# `{% generation %}` markers around exactly the tokens distsft trains on (content + <|im_end|>\n), so
# TRL's `assistant_only_loss` gives the same labels as distsft on this tokenizer (see the benchmark).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>\\n' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
SYSTEMS = ["You are a helpful assistant.", "Answer with the result only.",
           "You transform words exactly as asked."]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "po", "si", "de", "ba", "fu", "go", "hi", "ja", "ve",
             "zo", "an", "el", "or", "is", "um", "ex", "qu", "wy"]


def make_words(rng: random.Random, n: int = 300) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def task(rng: random.Random, words: list[str]) -> tuple[str, str]:
    """One (question, answer) pair: deterministic transformations a tiny model can pick up quickly."""
    w = rng.choice(words)
    kind = rng.choices(["upper", "reverse", "spell", "repeat", "add", "sort", "sentence", "count"],
                       weights=[3, 2, 2, 2, 2, 1, 2, 1])[0]
    if kind == "upper":
        return f"Uppercase: {w}", w.upper()
    if kind == "reverse":
        return f"Reverse: {w}", w[::-1]
    if kind == "spell":
        return f"Spell: {w}", "-".join(w)
    if kind == "repeat":
        n = rng.randint(2, 5)
        return f"Repeat {n} times: {w}", " ".join([w] * n)
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} + {b}?", str(a + b)
    if kind == "sort":
        return f"Sort the letters: {w}", "".join(sorted(w))
    # Long-tail lengths so packing and truncation matter: a lognormal number of words.
    k = max(2, min(120, int(rng.lognormvariate(2.3, 0.8))))
    sent = " ".join(rng.choice(words) for _ in range(k))
    if kind == "count":
        return f"How many words: {sent}", str(k)
    return f"Uppercase: {sent}", sent.upper()


def conversation(rng: random.Random, words: list[str]) -> dict:
    msgs = []
    if rng.random() < 0.2:
        msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(2 if rng.random() < 0.1 else 1):
        q, a = task(rng, words)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def instruction_row(rng: random.Random, words: list[str]) -> dict:
    w = rng.choice(words)
    if rng.random() < 0.3:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return {"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)}
    inst, fn = rng.choice([("Uppercase the word.", str.upper), ("Reverse the word.", lambda s: s[::-1]),
                           ("Spell the word with dashes.", lambda s: "-".join(s))])
    return {"instruction": inst, "input": w, "output": fn(w)}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token=None,
                                   additional_special_tokens=["<|eos|>", "<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    return fast


def build_model(tokenizer, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=200)
    args = ap.parse_args()

    rng = random.Random(SEED)
    words = make_words(rng)
    train = [conversation(rng, words) for _ in range(args.train)]
    evals = [conversation(rng, words) for _ in range(args.eval)]
    instruct = [instruction_row(rng, words) for _ in range(100)]
    write_jsonl(args.out / "data" / "train.jsonl", train)
    write_jsonl(args.out / "data" / "eval.jsonl", evals)
    write_jsonl(args.out / "data" / "instruct.jsonl", instruct)

    corpus = [m["content"] for c in train for m in c["messages"]]
    corpus += [r[k] for r in instruct for k in ("instruction", "input", "output")]
    corpus += ["user", "assistant", "system"] * 50
    tokenizer = build_tokenizer(corpus)
    out = args.out / "tiny-llama"
    tokenizer.save_pretrained(out)
    build_model(tokenizer, out)
    print(f"wrote {out} ({len(tokenizer)} tokens) and {len(train)}/{len(evals)}/{len(instruct)} rows "
          f"under {args.out / 'data'}")


if __name__ == "__main__":
    main()
