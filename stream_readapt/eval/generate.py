"""Prompts and greedy answers: the model's chat template, or a plain "Question: …\nAnswer:"."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Passage, Question


@dataclass
class Generator:
    """A loaded causal LM with its tokenizer and the greedy settings every point shares."""

    model: object
    tokenizer: object
    eos_token_id: int | list[int] | None
    max_new_tokens: int = 32

    @property
    def prompt_style(self) -> str:
        return "chat" if getattr(self.tokenizer, "chat_template", None) else "plain"

    def prompt_ids(self, question: Question, passage: Passage | None) -> list[int]:
        """Token ids of the prompt for `question` (with `passage` as context when given)."""
        context = f"Context: {passage.text}\n" if passage is not None else ""
        tok = self.tokenizer
        if self.prompt_style == "plain":
            return tok(f"{context}Question: {question.question}\nAnswer:")["input_ids"]
        user = f"{context}Question: {question.question}" if context else question.question
        text = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def answer(self, ids: list[int]) -> str:
        """Greedy continuation of `ids`, decoded without special tokens."""
        from transformers import GenerationConfig

        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        config = GenerationConfig(do_sample=False, max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_token_id,
                                  pad_token_id=self._pad_id())
        out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  generation_config=config)
        return self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()

    def _pad_id(self) -> int | None:
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        eos = self.eos_token_id
        return eos[0] if isinstance(eos, list) else eos


def eos_ids(source, model) -> int | list[int] | None:
    """The stop tokens of the model whose chat format we speak: its generation_config.json if it
    has one (an instruct model's end-of-turn token), else the loaded model's."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source).eos_token_id
    except OSError:  # no generation_config.json there
        return model.generation_config.eos_token_id
