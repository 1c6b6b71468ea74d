"""Text to token ids and back with the bundle's own `tokenizer.json` (the `tokenizers` library).

CLIP, as CLIP does: the tokenizer adds the start- and end-of-text tokens; a text longer
than the context is cut and its last token replaced by end-of-text (so pooling at
end-of-text still works); rows are padded to the longest text with the pad token.

SigLIP (`FixedLengthTokenizer`): the tokenizer adds the end token; every row is padded to
the context, as the model was trained.

Gemma: one prompt, <bos> first (added when the tokenizer does not add it), and the
generated ids back to text without special tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .packages import require

EOS = "<|endoftext|>"
SMALL_VOCAB = 10_000  # fewer pieces than any released model's: a tokenizer trained on a few texts


class TokenizerError(UserError):
    """A tokenizer file that cannot be used, or text it cannot encode."""


def load_tokenizer(path: str | Path):
    # optional (the runner extra), imported where it is used: image-only runs need no tokenizers
    tokenizers = require("tokenizers", "it turns text into token ids")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise TokenizerError(f"{path}: not a usable tokenizer.json ({e})") from e


def encode(tokenizer, text: str, path: str | Path = "the tokenizer") -> list[int]:
    """Token ids of `text`. A vocabulary that cannot spell a word of the text and has no
    unknown token to stand in for it makes `tokenizers` raise a bare Exception about its
    unknown token; here that is a TokenizerError naming the word and the file."""
    check_unicode(text, path)
    try:
        return tokenizer.encode(text).ids
    except Exception as e:  # tokenizers raises a bare Exception
        word, size = _unencodable_word(tokenizer, text), tokenizer.get_vocab_size()
        where = f"in {text[:60]!r}: " if word != text else ""
        small = ("; a tokenizer trained on a few captions, as the demo's, knows only their words"
                 if size < SMALL_VOCAB else "")
        raise TokenizerError(f"{path}: cannot encode {word[:60]!r} ({where}its vocabulary of {size} pieces cannot "
                             f"spell it and has no unknown token to stand in{small})") from e


def check_unicode(text: str, path: str | Path = "the tokenizer") -> None:
    """TokenizerError for a text no tokenizer can take: one with a lone surrogate, which is
    what a command line's undecodable bytes become in Python (tokenizers says only
    "TextInputSequence must be str")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"{path}: cannot encode {text[max(0, e.start - 30): e.start + 30]!r}: it is not "
                             f"valid Unicode ({e.reason}, character {e.start})") from None


def _unencodable_word(tokenizer, text: str) -> str:
    """The first word (as the tokenizer's pre-tokenizer cuts words) that alone fails to encode;
    the whole text when the pre-tokenizer is absent or every word alone encodes."""
    if tokenizer.pre_tokenizer is None:
        return text
    for _, (start, end) in tokenizer.pre_tokenizer.pre_tokenize_str(text):
        try:
            tokenizer.encode(text[start:end])
        except Exception:  # noqa: BLE001 - as above
            return text[start:end]
    return text


class ClipTokenizer:
    def __init__(self, path: str | Path, context: int):
        self.tokenizer, self.path = load_tokenizer(path), path
        # CLIP pads with its end-of-text token; pooling takes the first one in a row.
        self.eos_id = self.tokenizer.token_to_id(EOS)
        if self.eos_id is None:
            raise TokenizerError(f"{path}: has no {EOS} token; is it a CLIP tokenizer?")
        self.context, self.pad_id = context, self.eos_id

    def __call__(self, texts: list[str]) -> np.ndarray:
        """int64 [len(texts), longest] token ids."""
        if not texts:
            raise TokenizerError("no text given")
        rows = []
        for text in texts:
            ids = encode(self.tokenizer, text, self.path)
            if len(ids) > self.context:
                ids = ids[: self.context - 1] + [self.eos_id]
            if self.eos_id not in ids:
                raise TokenizerError(f"the tokenizer did not end {text!r} with the end-of-text token "
                                     f"{self.eos_id}: is it this model's tokenizer?")
            rows.append(ids)
        out = np.full((len(rows), max(map(len, rows))), self.pad_id, np.int64)
        for i, ids in enumerate(rows):
            out[i, : len(ids)] = ids
        return out


class FixedLengthTokenizer:
    """SigLIP's: every row padded to the context with `pad_id`, as the model was trained (its
    text tower pools the last position, padding or not). The tokenizer adds the end token; a
    longer text is cut to the context, keeping that last token."""

    def __init__(self, path: str | Path, context: int, pad_id: int):
        self.tokenizer, self.context, self.pad_id = load_tokenizer(path), context, pad_id

    def __call__(self, texts: list[str]) -> np.ndarray:
        """int64 [len(texts), context] token ids."""
        if not texts:
            raise TokenizerError("no text given")
        out = np.full((len(texts), self.context), self.pad_id, np.int64)
        for i, text in enumerate(texts):
            ids = encode(self.tokenizer, text)
            if len(ids) > self.context:
                ids = ids[: self.context - 1] + ids[-1:]
            out[i, : len(ids)] = ids
        return out


class GemmaTokenizer:
    def __init__(self, path: str | Path, bos_id: int):
        self.tokenizer, self.path, self.bos_id = load_tokenizer(path), path, bos_id

    def encode(self, text: str) -> list[int]:
        if not text.strip():
            raise TokenizerError("the prompt is empty")
        ids = encode(self.tokenizer, text, self.path)
        return ids if ids[:1] == [self.bos_id] else [self.bos_id] + ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class TextStream:
    """Generated token ids to text as they come: `push(token)` gives the text this token
    adds, "" while it is part of a character that the next tokens complete (a byte-level
    tokenizer spreads one character over several tokens; half of one decodes to U+FFFD)."""

    def __init__(self, decode):
        self.decode, self.tokens, self.shown = decode, [], ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new
