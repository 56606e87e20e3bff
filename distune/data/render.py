"""Turn a row into token ids and a loss mask (labels = -100 where nothing is trained).

Owns templating: column renames, the row formats (prompt/response, alpaca, sharegpt, messages), `{column}`
templates for prompt/response, the sample design (distune/data/design.py), the tokenizer's chat template when
it has one, and which tokens train (response / assistant turns only unless train_on_inputs). Imports neither
ray nor deepspeed.
"""

from __future__ import annotations


from transformers import PreTrainedTokenizerBase

from distune.data.design import Design
from distune.data.sources import DataError, Source
from distune.tasks.base import IGNORE
from distune.tasks.causal_lm import Sample

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class Renderer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, data_cfg, source: Source | str, seed: int = 0):
        self.tok = tokenizer
        self.cfg = data_cfg
        self.source = source if isinstance(source, Source) else Source(source)
        self.chat = bool(data_cfg.use_chat_template and getattr(tokenizer, "chat_template", None))
        self.design = Design(data_cfg.design, data_cfg.labels, seed)

    # -- public -------------------------------------------------------------------------------------

    def render(self, line: int, row: dict, canonical: bool = False) -> Sample:
        """One row -> token ids + loss mask. `canonical`: eval rows, which use the first instruction phrasing."""
        row = self.normalise(line, row)
        if self.cfg.format in ("messages", "sharegpt"):
            return self._render_messages(line, row)
        prompt = self.prompt_text(line, row, canonical, normalised=True)
        response = self.target_text(line, row)
        prompt_ids, completion_ids = self.pair(prompt, response)
        sample = self._assemble([(prompt_ids, False), (completion_ids, True)], line)
        sample.prompt_ids, sample.response = prompt_ids, response
        return sample

    def normalise(self, line: int, row: dict) -> dict:
        """Column renames, then the format's own columns as the templates' `prompt` / `response` / `messages`."""
        if self.cfg.columns:
            row = dict(row)
            for name, column in self.cfg.columns.items():
                if column not in row:
                    raise DataError(f"{self.source.at(line)}: data.columns.{name} names column {column!r}, row "
                                    f"has {', '.join(map(repr, row))}")
                row[name] = row[column]
        if self.cfg.format == "alpaca":
            for key in ("instruction", "output"):
                if not isinstance(row.get(key), str):
                    raise DataError(f"{self.source.at(line)}: alpaca rows need a string {key!r} column "
                                    f"(data.columns renames yours)")
            extra = row.get("input") or ""
            row = {**row, "prompt": row["instruction"] + (f"\n\n{extra}" if extra.strip() else ""),
                   "response": row["output"]}
        elif self.cfg.format == "sharegpt":
            turns = row.get("conversations")
            if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
                raise DataError(f"{self.source.at(line)}: sharegpt rows need a 'conversations' list of "
                                f"{{from, value}} objects")
            messages = []
            for i, t in enumerate(turns):
                role = SHAREGPT_ROLES.get(t.get("from"))
                if role is None or not isinstance(t.get("value"), str):
                    raise DataError(f"{self.source.at(line)}: conversations[{i}] needs 'from' in "
                                    f"{sorted(SHAREGPT_ROLES)} and a string 'value'")
                messages.append({"role": role, "content": t["value"]})
            row = {**row, "messages": messages}
        return row

    def prompt_text(self, line: int, row: dict, canonical: bool = False, normalised: bool = False) -> str:
        """The user turn: data.prompt filled from the row, with the design's instruction placed around it."""
        return self.design.prompt(self.input_text(line, row, normalised), self.design.instruction(line, canonical))

    def input_text(self, line: int, row: dict, normalised: bool = False) -> str:
        """data.prompt filled from the row, without the instruction."""
        row = row if normalised else self.normalise(line, row)
        return self.fill(self.cfg.prompt, row, line, "data.prompt")

    def conversation(self, turns: list[tuple[str, str]], query: str) -> list[int]:
        """Prompt ids for in-context learning: demonstration (user, assistant) turns, then the query, ending
        where the model's answer starts (the chat template's generation prompt; plain text without one)."""
        if self.chat:
            messages = self._system() + [m for u, a in turns for m in (
                {"role": "user", "content": u}, {"role": "assistant", "content": a})]
            return self._ids(self._apply(messages + [{"role": "user", "content": query}], generation_prompt=True))
        # Like training's plain-text samples (prompt, then response): separators belong in data.prompt.
        text = "".join(f"{u}{a}\n\n" for u, a in turns) + query
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def target_text(self, line: int, row: dict) -> str:
        """The response as the design writes it (aspects, label format, rationale first)."""
        d = self.cfg.design
        response = None if d.aspects else self.fill(self.cfg.response, row, line, "data.response")
        rationale = self.rationale_text(line, row) if d.reasoning == "cot" else None
        text = self.design.target(response, row, rationale, self.source.at(line))
        if not self.chat and response is not None and rationale is None:
            # A plain prompt runs on into the response, so the template's leading space belongs to it: after
            # "Sentiment:", " positive" is one word-token; "positive" would be another token the model never saw there.
            text = response[: len(response) - len(response.lstrip())] + text
        return text

    def rationale_text(self, line: int, row: dict) -> str:
        """data.design.rationale filled from a (normalised) row; DataError when the row lacks its columns."""
        return self.fill(self.cfg.design.rationale, row, line, "data.design.rationale")

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

    # -- internals ----------------------------------------------------------------------------------

    def _render_messages(self, line: int, row: dict) -> Sample:
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{self.source.at(line)}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                    "system", "user", "assistant"):
                raise DataError(f"{self.source.at(line)}: messages[{i}] needs role system/user/assistant and "
                                f"string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{self.source.at(line)}: no assistant turn, nothing to train on")
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
                raise DataError(f"{self.source.at(line)}: the chat template is not prefix-stable over turns")
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

    def fill(self, template: str, row: dict, line: int, key: str) -> str:
        try:
            return template.format_map({k: "" if v is None else v for k, v in row.items()})
        except KeyError as e:
            raise DataError(f"{self.source.at(line)}: {key} uses column {e.args[0]!r}, row has "
                            f"{', '.join(map(repr, row))}") from None

    def _system(self) -> list[dict]:
        return [{"role": "system", "content": self.cfg.system}] if self.cfg.system is not None else []

    def _apply(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []
