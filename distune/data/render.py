"""Turn a row into token ids and a loss mask (labels = -100 where nothing is trained).

Owns templating: `{column}` templates for prompt/response, the tokenizer's chat template when it has one,
and which tokens train (response / assistant turns only unless train_on_inputs). Imports neither ray
nor deepspeed.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from distune.data.sources import DataError

IGNORE = -100


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    line: int  # source line, for error messages
    prompt_ids: list[int] | None = None  # prompt_response only: for choice scoring
    response: str | None = None
    # Per-trained-position rows attached after rendering (e.g. a cached teacher's top-k): key -> [n_trained, ...]
    # in the order of the trained positions; `collate` scatters them onto those positions.
    extras: dict | None = None
    label: int | None = None  # sequence classification: the class index (then `labels` is empty)


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


class Renderer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, data_cfg, source: str):
        self.tok = tokenizer
        self.cfg = data_cfg
        self.source = source
        self.chat = bool(data_cfg.use_chat_template and getattr(tokenizer, "chat_template", None))

    # -- public -------------------------------------------------------------------------------------

    def render(self, line: int, row: dict) -> Sample:
        if self.cfg.format == "messages":
            return self._render_messages(line, row)
        prompt = self._fill(self.cfg.prompt, row, line, "data.prompt")
        response = self._fill(self.cfg.response, row, line, "data.response")
        prompt_ids, completion_ids = self.pair(prompt, response)
        sample = self._assemble([(prompt_ids, False), (completion_ids, True)], line)
        sample.prompt_ids, sample.response = prompt_ids, response
        return sample

    def pair(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt (everything before the response) and of the response (+ end token)."""
        if self.chat:
            messages = self._system() + [{"role": "user", "content": prompt}]
            prefix = self._apply(messages, generation_prompt=True)
            full = self._apply(messages + [{"role": "assistant", "content": response}], generation_prompt=False)
            if not full.startswith(prefix):
                raise DataError("the tokenizer's chat template does not render the prompt as a prefix of the "
                                "conversation; set data.use_chat_template: false")
            # Tokenizing the two parts separately keeps the prompt ids identical between training and eval.
            return self._ids(prefix), self._ids(full[len(prefix):])
        prompt_ids = self.tok(prompt, add_special_tokens=True)["input_ids"]
        completion = self._ids(response)
        if self.tok.eos_token_id is not None:
            completion = completion + [self.tok.eos_token_id]
        return prompt_ids, completion

    def render_class(self, line: int, row: dict, labels: list[str]) -> Sample:
        """Sequence classification: the prompt text as the model's input, the response as a class index."""
        text = self._fill(self.cfg.prompt, row, line, "data.prompt")
        name = self._fill(self.cfg.response, row, line, "data.response").strip()
        if name not in labels:
            raise DataError(f"{self.source} line {line}: class {name!r} is not one of data.labels {labels}")
        ids = self.tok(text, truncation=True, max_length=self.cfg.max_length)["input_ids"]
        return Sample(ids, [], line, response=name, label=labels.index(name))

    def class_name(self, line: int, row: dict) -> str:
        return self._fill(self.cfg.response, row, line, "data.response").strip()

    # -- internals ----------------------------------------------------------------------------------

    def _render_messages(self, line: int, row: dict) -> Sample:
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{self.source} line {line}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                    "system", "user", "assistant"):
                raise DataError(f"{self.source} line {line}: messages[{i}] needs role system/user/assistant and "
                                f"string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{self.source} line {line}: no assistant turn, nothing to train on")
        if not self.chat:
            raise DataError("data.format: messages needs a tokenizer with a chat template")
        # Render growing prefixes: text added by an assistant turn trains, everything else does not.
        pieces: list[tuple[list[int], bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self._apply(messages[:i], generation_prompt=True)
            upto = self._apply(messages[: i + 1], generation_prompt=False)
            if not prefix.startswith(done) or not upto.startswith(prefix):
                raise DataError(f"{self.source} line {line}: the chat template is not prefix-stable over turns")
            pieces += [(self._ids(prefix[len(done):]), False), (self._ids(upto[len(prefix):]), True)]
            done = upto
        rest = self._apply(messages, generation_prompt=False)[len(done):]
        if rest:
            pieces.append((self._ids(rest), False))
        return self._assemble(pieces, line)

    def _assemble(self, pieces: list[tuple[list[int], bool]], line: int) -> Sample:
        ids: list[int] = []
        labels: list[int] = []
        for part, trained in pieces:
            ids += part
            labels += part if (trained or self.cfg.train_on_inputs) else [IGNORE] * len(part)
        n = self.cfg.max_length
        return Sample(ids[:n], labels[:n], line)

    def _fill(self, template: str, row: dict, line: int, key: str) -> str:
        try:
            return template.format_map({k: "" if v is None else v for k, v in row.items()})
        except KeyError as e:
            raise DataError(f"{self.source} line {line}: {key} uses column {e.args[0]!r}, row has "
                            f"{', '.join(map(repr, row))}") from None

    def _system(self) -> list[dict]:
        return [{"role": "system", "content": self.cfg.system}] if self.cfg.system is not None else []

    def _apply(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []
