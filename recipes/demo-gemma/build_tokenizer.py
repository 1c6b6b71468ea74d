"""The demo Function-Gemma's tokenizer: a byte-level BPE with Gemma's special tokens.

Ids 0-5 are Gemma's (<pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn>), 6-12 the
six function tokens and <escape>, as added tokens so that text containing them encodes
to them (the six turn tokens are special: `decode(skip_special_tokens=True)` drops them;
the function tokens and <escape> are not, so a decoded answer keeps its call syntax).

How text is cut before merging decides both prompt length and whether the model can
copy. The pre-tokenizer isolates every whitespace character, every digit, and sentence
punctuation before a space or the end (`Lisbon?` -> `Lisbon`, `?`): a city, name or
message text is then the same tokens in the request (after a space) and in the call
(after <escape>), so answering is copying tokens. Everything else stays whole, so the
declaration syntax that repeats in every prompt (`,parameters:{properties:{city:{type:`)
merges into a few tokens and prompts stay short.

The merges are learned here, not by the `tokenizers` trainer, for the reason
prepare/demo_models.py gives (its ties between equally frequent pairs follow hash order,
so the same corpus gave different files): highest count first, ties to the smaller pair,
with incremental pair counts so that a few thousand merges take seconds.
"""

from __future__ import annotations

import heapq
from collections import Counter

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
FUNCTION_TOKENS = ["<start_function_declaration>", "<end_function_declaration>", "<start_function_call>",
                   "<end_function_call>", "<start_function_response>", "<end_function_response>", "<escape>"]
ADDED = SPECIALS + FUNCTION_TOKENS
# One whitespace character, one digit, `'s` or sentence punctuation before a space or the end
# of a piece of text, and a colon before a space.
PATTERN = r"\s|\d|'s(?=\s|$)|[?!.,;]+(?=\s|$)|:(?=\s)"


def pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def split_added(text: str) -> list[str]:
    """`text` without its added tokens: the pieces between them."""
    pieces = [text]
    for token in ADDED:
        pieces = [part for piece in pieces for part in piece.split(token)]
    return [p for p in pieces if p]


def word_counts(texts) -> Counter:
    pre = pre_tokenizer()
    counts = Counter()
    for text in texts:
        for piece in split_added(text):
            counts.update(w for w, _ in pre.pre_tokenize_str(piece))
    return counts


def train_bpe(counts: Counter, alphabet: list[str], n_merges: int, min_count: int = 2):
    """Merges learned from word counts, deterministic: (merges, symbols in vocabulary order)."""
    words = [list(w) for w in sorted(counts)]
    freq = [counts[w] for w in sorted(counts)]
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pairs[pair] += freq[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    merges, done = [], set()
    while heap and len(merges) < n_merges:
        negative, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -negative or pair in done:
            continue  # stale entry (the count changed since it was pushed), or merged already
        if -negative < min_count:
            break
        merges.append(pair)
        done.add(pair)
        joined = pair[0] + pair[1]
        changed = set()
        for i in sorted(where.pop(pair, ())):
            w, n = words[i], freq[i]
            for p in zip(w, w[1:]):
                pairs[p] -= n
                changed.add(p)
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    out.append(joined)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for p in zip(out, out[1:]):
                pairs[p] += n
                where.setdefault(p, set()).add(i)
                changed.add(p)
        for p in changed:
            if pairs[p] > 0:
                heapq.heappush(heap, (-pairs[p], p))
            else:
                pairs.pop(p, None)
    symbols = sorted(set(alphabet))
    seen = set(symbols)
    for a, b in merges:
        if a + b not in seen:
            symbols.append(a + b)
            seen.add(a + b)
    return merges, symbols


def build(texts, vocab_size: int):
    """A `tokenizers.Tokenizer` of `vocab_size` tokens trained on `texts` (rendered chats)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    n_merges = vocab_size - len(ADDED) - len(set(alphabet))
    merges, symbols = train_bpe(word_counts(texts), alphabet, n_merges)
    vocab = {token: i for i, token in enumerate(ADDED)}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in FUNCTION_TOKENS])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    for i, token in enumerate(ADDED):
        assert tok.token_to_id(token) == i, token
    return tok


def tokenizer_config(chat_template: str, max_length: int) -> dict:
    """tokenizer_config.json: what transformers needs to load the tokenizer offline
    (`AutoTokenizer.from_pretrained(dir)`), and the chat template."""
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": t in SPECIALS} for i, t in enumerate(ADDED)}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": decoder,
            "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": max_length, "padding_side": "left", "chat_template": chat_template}
