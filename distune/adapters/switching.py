"""Serve several adapters on one base model loaded once: `use(name)` switches the active adapter per request
(PEFT `set_adapter`), no weight is reloaded or merged. Greedy generation and choice scoring, with the chat
template training used (when the tokenizer has one). Imports neither ray nor deepspeed.

    adapters = AdapterSet(base, {"sentiment": "runs/x/export/sentiment", "topics": "runs/x/export/topics"})
    adapters.generate(["I love it"], adapter="sentiment")
    adapters.score("I love it", ["positive", "negative"], adapter="topics")
"""

from __future__ import annotations

from pathlib import Path

import torch

from distune.adapters.store import AdapterError, base_of, tokenizer_source


def load_base(source: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)


class AdapterSet:
    def __init__(self, adapters: dict[str, str | Path], base: str | None = None, dtype: torch.dtype = torch.float32,
                 device: str = "cpu"):
        from peft import PeftModel
        from transformers import AutoTokenizer

        if not adapters:
            raise AdapterError("give at least one adapter (NAME=PATH)")
        (first, first_path), *rest = adapters.items()
        source = base_of(Path(first_path), base)
        self.model = PeftModel.from_pretrained(load_base(source, dtype), str(first_path), adapter_name=first)
        for name, path in rest:
            self.model.load_adapter(str(path), adapter_name=name)
        self.model.to(device).eval()
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(Path(first_path), source))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.names = list(adapters)

    def use(self, name: str) -> None:
        if name not in self.names:
            raise AdapterError(f"no adapter {name!r}; loaded: {', '.join(self.names)}")
        self.model.set_adapter(name)

    def prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """The prompt as training rendered it: through the chat template when there is one."""
        tok = self.tokenizer
        if tok.chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]  # as distune.data.render tokenizes
        return tok(prompt, add_special_tokens=True)["input_ids"]

    @torch.no_grad()
    def generate(self, prompts: list[str], adapter: str, max_new_tokens: int = 32,
                 system: str | None = None) -> list[str]:
        """Greedy continuations of each prompt with `adapter` active."""
        self.use(adapter)
        out = []
        for prompt in prompts:  # one at a time: no padding, so outputs equal a lone model's exactly
            ids = torch.tensor([self.prompt_ids(prompt, system)], device=self.device)
            gen = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out

    @torch.no_grad()
    def score(self, prompt: str, choices: list[str], adapter: str, system: str | None = None) -> list[float]:
        """Summed log-probability of each choice's tokens after the prompt, with `adapter` active."""
        self.use(adapter)
        head = self.prompt_ids(prompt, system)
        scores = []
        for choice in choices:
            tail = self.tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([head + tail], device=self.device)
            logprobs = torch.log_softmax(self.model(input_ids=ids).logits[0, len(head) - 1:-1].float(), dim=-1)
            scores.append(logprobs.gather(-1, torch.tensor(tail, device=self.device)[:, None]).sum().item())
        return scores
