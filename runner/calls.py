"""Function-Gemma's use case: a conversation and its tools in, the model's turn out, read
into function calls typed by the tools' schemas.

One pipeline for everyone who asks: `runner call`, the server's chat completions
(runner/serve/), `doit verify`'s call metrics and the demo's evaluation
(recipes/demo-gemma/evaluate.py). The steps:

    check the messages and tools (runner/conversation.py: a bad entry is named, not the template)
    -> render them with the bundle's chat template and encode (runner/chat.py)
    -> decode, greedily unless a sampler says otherwise, to a Function-Gemma stop token
       (runner/generate.py; runner/function_calls.py's stop rule)
    -> decode the tokens with the function tokens kept (they are the syntax) and parse the
       turn (runner/function_calls.py)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import BundleError
from .chat import Chat
from .conversation import check_messages, check_tools
from .families import GEMMA_FAMILY
from .function_calls import Answer, parse_answer
from .function_calls import stop_ids as call_stop_ids
from .generate import Sampler, Step, generate
from .generate import stop_ids as eos_ids
from .load import Loaded

DEFAULT_STEPS = 128  # tokens an answer may take at most, unless told


@dataclass
class Reply:
    """One answered turn: the parsed answer and how it came about."""

    answer: Answer
    prompt: list[int]  # the rendered conversation's token ids
    tokens: list[int]  # what the model generated, the stop token included
    stopped: str  # "stop" (a stop token), "steps" (the limit), "context" (the model's context)
    steps: list[Step]

    @property
    def prefill_ms(self) -> float:
        return self.steps[0].ms

    @property
    def ms_per_token(self) -> float | None:
        later = [s.ms for s in self.steps[1:]]
        return float(np.mean(later)) if later else None


class Assistant:
    """A Function-Gemma model, its LM head and chat template: `reply(messages, tools)`."""

    def __init__(self, model, head, chat: Chat):
        self.model, self.head, self.chat = model, head, chat
        self.eos = eos_ids(model.config)

    @classmethod
    def of(cls, loaded: Loaded) -> "Assistant":
        """The assistant of a loaded Function-Gemma bundle (its own chat template)."""
        loaded.require(GEMMA_FAMILY, "answering a conversation")
        if not loaded.bundle.chat:
            raise BundleError(f"{loaded.bundle.dir}: no chat template in the bundle (the checkpoint had no "
                              "tokenizer_config.json with chat_template, nor chat_template.jinja)")
        return cls(loaded.model, loaded.head, Chat.from_dir(loaded.bundle.dir))

    def stop(self, parallel: bool = False) -> set[int]:
        """The stop rule: a finished call, the tool's turn, the end of the turn (runner/function_calls.py);
        `parallel` lets the model add calls after the first."""
        return call_stop_ids(self.chat.tokenizer, self.eos, parallel=parallel)

    def prompt(self, messages, tools=None, source: str = "the conversation", tools_source: str | None = None,
               add_generation_prompt: bool = True, most_tokens: int | None = None) -> list[int]:
        """The conversation's token ids, its messages and tools checked first (a problem names
        `source` or `tools_source` and the entry); `most_tokens`: see `Chat.encode`."""
        messages = check_messages(messages, source)
        tools = check_tools(tools, tools_source or source)
        return self.chat.encode(messages, tools, add_generation_prompt, most_tokens)

    def read(self, tokens: list[int], tools=None) -> Answer:
        """The model's turn as calls typed by the tools' schemas, and text."""
        return parse_answer(self.chat.tokenizer.decode(tokens, skip_special_tokens=False), tools or None)

    def reply(self, messages, tools=None, *, steps: int = DEFAULT_STEPS, parallel: bool = False,
              sampler: Sampler | None = None, source: str = "the conversation",
              tools_source: str | None = None) -> Reply:
        """Answer the conversation: greedily unless `sampler` says otherwise, up to `steps` tokens."""
        prompt = self.prompt(messages, tools, source, tools_source)
        stop = self.stop(parallel)
        done = list(generate(self.model, self.head, prompt, steps, sampler or Sampler(), stop))
        tokens = [s.token for s in done]
        stopped = "stop" if tokens[-1] in stop else "steps" if len(tokens) == steps else "context"
        return Reply(self.read(tokens, tools), prompt, tokens, stopped, done)
