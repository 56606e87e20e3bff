"""Tiny real artifacts for fast tests: a BPE tokenizer with a chat template, a 2-layer Llama, toy data.

Built from configs on the fly (no downloads), saved as ordinary Hugging Face folders so the code under
test loads them through its real local-folder path.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = {
    "positive": ["great", "happy", "love", "wonderful", "good", "nice", "excellent", "fun"],
    "negative": ["awful", "sad", "hate", "terrible", "bad", "poor", "boring", "ugly"],
}
FILLER = ["the", "movie", "was", "day", "food", "trip", "really", "so", "a", "it", "this", "very"]


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.sample(FILLER, 3) + [rng.choice(WORDS[label])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


INTENSIFIERS = ["very", "so", "really"]


def ner_rows(n: int, seed: int = 0) -> list[dict]:
    """Word/BIO-tag rows over the tiny tokenizers' words: a sentiment word is an entity (POS or NEG), an
    intensifier right before it belongs to it (B-POS I-POS); some words split into several sub-tokens."""
    rng = random.Random(seed)
    plain = [w for w in FILLER if w not in INTENSIFIERS]
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(1, 2)):
            kind = rng.choice(["positive", "negative"])
            name = "POS" if kind == "positive" else "NEG"
            tokens += rng.sample(plain, rng.randint(1, 2))
            tags += ["O"] * (len(tokens) - len(tags))
            if rng.random() < 0.4:
                tokens.append(rng.choice(INTENSIFIERS))
                tags.append(f"B-{name}")
                tokens.append(rng.choice(WORDS[kind]))
                tags.append(f"I-{name}")
            else:
                tokens.append(rng.choice(WORDS[kind]))
                tags.append(f"B-{name}")
        rows.append({"words": tokens, "ner": tags})
    return rows


def qa_rows(n: int, seed: int = 0, nested: bool = True) -> list[dict]:
    """Extractive QA over the tiny tokenizers' words: the context holds a positive and a negative word (maybe
    with an intensifier), the question `good` or `bad` asks for one of them. SQuAD's nested `answers`, or
    flat `answer` + `answer_start` columns."""
    rng = random.Random(seed)
    plain = [w for w in FILLER if w not in INTENSIFIERS]
    rows = []
    for _ in range(n):
        parts = rng.sample(plain, 3)
        phrases = {}
        for kind, avoid in (("positive", "good"), ("negative", "bad")):
            word = rng.choice([w for w in WORDS[kind] if w != avoid])
            phrases[kind] = f"{rng.choice(INTENSIFIERS)} {word}" if rng.random() < 0.3 else word
            parts.insert(rng.randint(0, len(parts)), phrases[kind])
        context = " ".join(parts)
        kind = rng.choice(["positive", "negative"])
        answer = phrases[kind]
        start = f" {context} ".index(f" {answer} ")
        question = "good" if kind == "positive" else "bad"
        rows.append({"question": question, "context": context, "answers": {"text": [answer], "answer_start": [start]}}
                    if nested else {"question": question, "context": context, "answer": answer, "answer_start": start})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"{r['text']} {r['label']}" for r in sentiment_rows(400, seed=1)]
    corpus += ["Classify the sentiment: positive or negative. Answer with one word.", "user assistant system"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model_dir(out: Path, hidden: int = 64, layers: int = 2, tied: bool = False,
                    max_shard_size: str | None = None) -> Path:
    """A tiny Llama; `tied` shares the input and output embeddings (as SmolLM2 does), `max_shard_size` saves it
    in several safetensors files with an index (as big checkpoints are)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tied,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    shards = {"max_shard_size": max_shard_size} if max_shard_size else {}
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True, **shards)
    return out


def build_encoder_dir(out: Path) -> Path:
    """A 2-layer BERT with its own WordPiece tokenizer (ids unrelated to tiny_model's BPE): a student of
    another architecture and vocabulary, as MiniLM is to SmolLM2."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    corpus = [r["text"] for r in sentiment_rows(400, seed=2)] + ["sentiment"]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(  # BERT's: pairs get segment ids 0 / 1
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=fast.pad_token_id)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    return out


def build_teacher_dir(out: Path, sharpen: float = 40.0, pad_rows: int = 0) -> Path:
    """A 4-layer, 96-wide model with tiny_model's tokenizer and confident (low-entropy) predictions, so
    distillation has a clear target; `pad_rows` extra output rows mimic a padded embedding matrix."""
    import torch
    from transformers import LlamaForCausalLM

    build_model_dir(out, hidden=96, layers=4)
    model = LlamaForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    if pad_rows:
        model.resize_token_embeddings(model.config.vocab_size + pad_rows, mean_resizing=False)
    model.save_pretrained(out, safe_serialization=True)
    return out


def base_config(model_dir: Path, data_file: Path, run_dir: Path, **sections) -> dict:
    """A small, fast run config as a dict; `sections` override whole sections' keys."""
    cfg = {
        "run": {"name": "t", "output_dir": str(run_dir), "seed": 0},
        "model": {"path": str(model_dir)},
        "method": {"name": "full"},
        "data": {"path": str(data_file), "prompt": "Sentiment: {text}", "response": "{label}",
                 "max_length": 64, "eval_size": 8},
        "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3},
        "eval": {"before_training": False, "micro_batch_size": 4},
        "deepspeed": {"stage": 0},
        "cluster": {"num_workers": 1, "use_gpu": False},
        "wandb": {"mode": "disabled"},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def tree_bytes(root) -> dict:
    """Every file of a store (meta.json without its timing and key)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f != "meta.json":
                p = os.path.join(dirpath, f)
                out[os.path.relpath(p, root)] = open(p, "rb").read()
    meta = json.loads(open(os.path.join(root, "meta.json")).read())
    meta.pop("seconds"), meta.pop("key")
    out["meta.json"] = meta
    return out
