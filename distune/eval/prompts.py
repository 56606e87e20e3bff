"""The prompts of each prompting mode, built from the run config's own sample design.

zero_shot         the instruction and the input, as the config renders them for training
few_shot          k demonstrations from the training split (random per query, or the nearest by embedding),
                  each a user turn + the target the config trains on, then the query
few_shot_cot      the same demonstrations written as "<rationale>\\nAnswer: <answer>" when the data has the
                  design's rationale columns, else as "Answer: <answer>"; the query asks to think step by step
self_consistency  few_shot_cot prompts, n samples each, majority vote over the parsed answers
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from distune.data import DataError
from distune.data.design import ANSWER, Design, Parsed

MODES = ("zero_shot", "few_shot", "few_shot_cot", "self_consistency")
COT_INSTRUCTION = ("Think step by step. Then write the final answer after 'Answer:' at the end, in the format "
                   "asked for.")


@dataclass
class Example:
    line: int
    row: dict


class PromptBuilder:
    def __init__(self, renderer, train: list[Example], k: int, select: str, seed: int,
                 neighbours: list[list[int]] | None = None):
        if k > len(train):
            raise DataError(f"--shots {k}: the training split has only {len(train)} rows to draw demonstrations from")
        self.r, self.train, self.k, self.select, self.seed = renderer, train, k, select, seed
        self.neighbours = neighbours  # eval row i -> indices into train, nearest first
        d = renderer.cfg.design
        self.design = Design(d, renderer.cfg.labels, seed)
        self.cot_design = Design(d.model_copy(update={"reasoning": "cot"}), renderer.cfg.labels, seed)

    def design_for(self, mode: str) -> Design:
        """How a mode's answers are parsed: CoT modes read what follows the last 'Answer:'."""
        return self.cot_design if mode in ("few_shot_cot", "self_consistency") else self.design

    def prompt(self, mode: str, i: int, ex: Example, instruction: str | None = None) -> list[int]:
        """Token ids of mode's prompt for eval row i. `instruction` replaces the config's (instruction search)."""
        query = self.query(ex, instruction)
        if mode == "zero_shot":
            return self.r.conversation([], query)
        demos = self.demos(i, ex)
        if mode == "few_shot":
            turns = [(self.query(d, instruction), self.r.target_text(d.line, self.r.normalise(d.line, d.row)))
                     for d in demos]
            return self.r.conversation(turns, query)
        turns = [(self.query(d, instruction) + "\n\n" + COT_INSTRUCTION, self.cot_target(d)) for d in demos]
        return self.r.conversation(turns, query + "\n\n" + COT_INSTRUCTION)

    def query(self, ex: Example, instruction: str | None) -> str:
        if instruction is None:
            return self.r.prompt_text(ex.line, ex.row, canonical=True)
        return self.design.prompt(self.r.input_text(ex.line, ex.row), instruction)

    def cot_target(self, ex: Example) -> str:
        row = self.r.normalise(ex.line, ex.row)
        if self.r.cfg.design.reasoning == "cot":
            return self.r.target_text(ex.line, row)
        answer = self.r.target_text(ex.line, row)
        sep = "\n" if "\n" in answer else " "
        try:
            rationale = self.r.rationale_text(ex.line, row).strip()
        except DataError:  # no rationale columns in this data: demonstrations show the answer format only
            rationale = ""
        return f"{rationale}\n{ANSWER}{sep}{answer}" if rationale else f"{ANSWER}{sep}{answer}"

    def demos(self, i: int, ex: Example) -> list[Example]:
        if self.select == "nearest":
            picked = [self.train[j] for j in self.neighbours[i][: self.k]]
            return picked[::-1]  # the most similar demonstration last, next to the query
        return random.Random(f"{self.seed}:demos:{ex.line}").sample(self.train, self.k)


def nearest(queries: list[str], pool: list[str], source: str, k: int, batch_size: int = 32) -> list[list[int]]:
    """For each query, the indices of the k most similar pool texts (cosine of mean-pooled last hidden states of
    the model at `source`, e.g. a sentence encoder such as all-MiniLM-L6-v2)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModel.from_pretrained(source).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                enc = tok(texts[start:start + batch_size], padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
                h = model(**enc).last_hidden_state.float()
                m = enc["attention_mask"].unsqueeze(-1).float()
                out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out)

    sims = embed(queries) @ embed(pool).T
    return sims.topk(min(k, len(pool)), dim=-1).indices.tolist()


def majority(samples: list[Parsed]) -> Parsed:
    """Self-consistency's vote: the most common parsed answer among the samples that parsed (ties: the earliest
    drawn). Only when none parsed does the answer count as unparseable."""
    usable = [p for p in samples if "unparseable" not in p.errors] or samples[:1]
    keys = [repr(sorted(p.values.items(), key=lambda kv: kv[0])) for p in usable]
    best = max(keys, key=lambda key: (keys.count(key), -keys.index(key)))
    return usable[keys.index(best)]
