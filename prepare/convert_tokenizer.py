"""A SentencePiece-only checkpoint's tokenizer as the `tokenizer.json` the runner reads.

The runner reads tokenizers with the `tokenizers` library alone (runner/tokenizer.py). SigLIP
checkpoints (google/siglip-*) ship only `spiece.model`, which transformers reads with its slow
`SiglipTokenizer` (the `sentencepiece` package). Here, on the build host, transformers'
SentencePiece converter turns it into a `tokenizer.json`, plus what the slow tokenizer does
in Python before SentencePiece sees the text (its `canonicalize_text`: lower case, ASCII
punctuation removed, runs of whitespace made one space, ends stripped) and the end-of-text
token it appends. tests/test_siglip_tokenizer.py checks the two token for token; they differ
only on "</s>" or "<unk>" typed inside a text, which SiglipTokenizer reads as the control
token and tokenizer.json as text.

transformers and sentencepiece are build-host packages, imported where they are used.
"""

from __future__ import annotations

import string
from pathlib import Path

from runner.packages import require

SENTENCEPIECE_FILE = "spiece.model"


def siglip_tokenizer_json(directory: str | Path) -> str:
    """The tokenizer.json text equivalent to `SiglipTokenizer.from_pretrained(directory)`
    (its spiece.model and, where there is one, tokenizer_config.json)."""
    require("sentencepiece", "it converts the checkpoint's spiece.model into tokenizer.json")
    transformers = require("transformers", "it converts the checkpoint's spiece.model into tokenizer.json")
    from tokenizers import Regex, normalizers, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    class SiglipConverter(SpmConverter):
        def normalizer(self, proto):
            canonical = [normalizers.Lowercase()] if self.original_tokenizer.do_lower_case else []
            punctuation = "[" + "".join("\\" + c for c in string.punctuation) + "]"
            canonical += [normalizers.Replace(Regex(punctuation), ""), normalizers.Replace(Regex(r"\s+"), " "),
                          normalizers.Strip()]
            return normalizers.Sequence(canonical + [super().normalizer(proto)])

        def post_processor(self):
            eos = str(self.original_tokenizer.eos_token)
            eos_id = self.original_tokenizer.convert_tokens_to_ids(eos)
            return processors.TemplateProcessing(single=["$A", eos], pair=["$A", eos, "$B", eos],
                                                 special_tokens=[(eos, eos_id)])

    slow = transformers.SiglipTokenizer.from_pretrained(str(directory))
    return SiglipConverter(slow).converted().to_str()
