"""Answer with a run's fine-tuned global model: one prompt, or a chat, streaming tokens."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .logs import get_logger
from .runs import run_adapter

log = get_logger(__name__)


class ChatModel:
    """The run's base model (quantized as in training) with the round's adapter."""

    def __init__(self, run_dir: Path, round_: int | None = None) -> None:
        self.cfg, adapter = run_adapter(run_dir, round_)  # a wrong directory is refused before the imports

        from peft import PeftModel

        from .model import load_base_model

        loaded = load_base_model(self.cfg.model)
        self.tokenizer = loaded.tokenizer
        self.model = PeftModel.from_pretrained(loaded.model, str(adapter)).eval()
        log.info("Loaded %s with adapter %s", self.cfg.model.name, adapter)

    def stream(self, messages: list[dict[str, str]], max_new_tokens: int = 64) -> Iterator[str]:
        """Yield the answer's text piece by piece (greedy decoding)."""
        from transformers import TextIteratorStreamer

        system = self.cfg.data.system_prompt
        full = ([{"role": "system", "content": system}] if system else []) + messages
        text = self.tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs: dict[str, Any] = dict(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        thread = threading.Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        thread.start()
        yield from streamer
        thread.join()

    def answer(self, prompt: str, max_new_tokens: int = 64) -> str:
        return "".join(self.stream([{"role": "user", "content": prompt}], max_new_tokens))
