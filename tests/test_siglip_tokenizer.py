"""spiece.model -> tokenizer.json (prepare/convert_tokenizer.py) against the checkpoint's own
SiglipTokenizer (transformers, sentencepiece), token for token.

One known difference, left so: SiglipTokenizer reads "</s>" or "<unk>" typed inside a text
as the control token; tokenizer.json reads them as the characters they are."""

from __future__ import annotations

import random

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from prepare.convert_tokenizer import SENTENCEPIECE_FILE  # noqa: E402
from prepare.demo_models import WORLD_WORDS, captions, write_siglip_tokenizer  # noqa: E402
from prepare.families.siglip import ensure_tokenizer_json  # noqa: E402
from runner.tokenizer import FixedLengthTokenizer, load_tokenizer  # noqa: E402


def texts() -> list[str]:
    """A few hundred: captions, mixed case and punctuation, accents, other scripts, emoji,
    odd whitespace, unknown characters, texts longer than the context."""
    rng = random.Random(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()-_/&%$#@")
    alphabet += list("éèêëàâäîïôöùûüçñßÉÀÜØøåæœ") + ["🙂", "🐶", "👍🏽", "🇫🇷", "東", "京", "Ж", "Ω", "\t", "\n", "\u00a0"]
    out = ["", " ", "a photo of a cat", "A PHOTO OF A CAT!!!", "  two   dogs\t on\nthe grass  ", "it's 3 o'clock",
           "crème brûlée, s'il vous plaît", "🙂🐶🐱", "東京の写真", "Москва зимой", "ελληνικά γράμματα",
           "word " * 80, "▁leading underline", "less < more > equal"]
    out += [c.capitalize() + rng.choice([".", "!", "?", "", " :)"]) for c in captions()[::7]]
    out += [" ".join(rng.choice(WORLD_WORDS + captions()[:40]) for _ in range(rng.randint(1, 6)))
            for _ in range(100)]
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50))) for _ in range(150)]
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("siglip-tokenizer")
    write_siglip_tokenizer(directory)
    return directory


def test_tokenizer_json_encodes_as_siglip_tokenizer(checkpoint):
    slow = transformers.SiglipTokenizer.from_pretrained(str(checkpoint))
    fast = load_tokenizer(checkpoint / "tokenizer.json")
    cases = texts()
    assert len(cases) >= 300
    unknown = 0
    for text in cases:
        ids = slow(text)["input_ids"]
        assert fast.encode(text).ids == ids, (text, slow.convert_ids_to_tokens(ids), fast.encode(text).tokens)
        unknown += slow.unk_token_id in ids
    assert 0 < unknown < len(cases) / 2  # the cases reach the unknown token, and mostly not


def test_rows_as_siglip_pads_and_truncates(checkpoint):
    """The runner's rows: the processor's padding="max_length", truncation=True at 64."""
    slow = transformers.SiglipTokenizer.from_pretrained(str(checkpoint))
    ours = FixedLengthTokenizer(checkpoint / "tokenizer.json", 64, slow.pad_token_id)
    cases = texts()
    ref = slow(cases, padding="max_length", max_length=64, truncation=True)["input_ids"]
    assert np.array_equal(ours(cases), np.array(ref))
    assert max(len(slow(t)["input_ids"]) for t in cases) > 64  # truncation was exercised


def test_a_checkpoint_with_only_spiece_model_gets_its_tokenizer_json(checkpoint, tmp_path):
    for name in (SENTENCEPIECE_FILE, "tokenizer_config.json"):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    made = ensure_tokenizer_json(tmp_path)
    assert made.read_text() == (checkpoint / "tokenizer.json").read_text()
