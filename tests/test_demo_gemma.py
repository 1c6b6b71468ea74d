"""The committed demo Function-Gemma (recipes/demo-gemma): its files agree with each other,
its held-out data is held out, and the runner answers with the exact calls."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from runner.chat import Chat
from runner.function_calls import parse_answer, stop_ids
from runner.gemma import GemmaConfig, tensor_shapes

from .conftest import doit

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo-gemma"
sys.path.insert(0, str(DEMO))
import conversations  # noqa: E402

POOL = 64 * 10  # train.py draws conversations in pools of 64 batches of 10
EASY_POOLS, POOLS = -(-250 // 64), -(-750 // 64)  # 250 easy steps, then 750


def rows(name):
    return [json.loads(line) for line in (DEMO / name).read_text().splitlines() if line.strip()]


def user_texts(messages):
    return [m["content"] for m in messages if m["role"] == "user"]


HELD_OUT_ROWS = 24  # of verify.jsonl, for the tests' time; `doit recipe=recipes/demo-gemma.yaml verify` does all 240


def heldout_value_pattern():
    values = [str(v) for k, vs in conversations.HELDOUT_VALUES.items() if k != "minutes" for v in vs]
    return re.compile("|".join(r"(?<![\w'])" + re.escape(v) + r"(?![\w'])" for v in values), re.IGNORECASE)


def test_files_agree():
    config = json.loads((DEMO / "config.json").read_text())
    tok_config = json.loads((DEMO / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == (DEMO / "template.jinja").read_text()
    chat = Chat.from_dir(DEMO)
    assert chat.tokenizer.get_vocab_size() == config["vocab_size"] == 4096
    for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]):
        assert chat.tokenizer.token_to_id(token) == i
    c = GemmaConfig.from_dict(config)
    assert set(c.layer_types) == {"sliding_attention", "full_attention"} and c.num_hidden_layers <= 8
    shapes = tensor_shapes(c)
    linears = {k: v for k, v in shapes.items() if k.endswith("proj.weight")}
    assert {v for k, v in linears.items() if not k.endswith(("k_proj.weight", "v_proj.weight"))} == {(256, 256)}
    assert c.num_key_value_heads < c.num_attention_heads  # grouped-query attention, as Gemma-3 270M


def test_transformers_loads_the_tokenizer_offline():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(DEMO, local_files_only=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert tok.decode([6, 12, 8], skip_special_tokens=True) == \
        "<start_function_declaration><escape><start_function_call>"  # function tokens are not special


def test_heldout_phrasings_and_values_never_occur_in_training_or_calibration():
    for held in (conversations.HELDOUT_PHRASES, conversations.FRESH_PHRASES):
        for tool, phrases in held.items():
            norm = {re.sub(r"[^\w{} ]", "", p.lower()) for p in conversations.PHRASES[tool]}
            assert not norm & {re.sub(r"[^\w{} ]", "", p.lower()) for p in phrases}, tool
    assert not set(conversations.TRAIN_MINUTES) & set(conversations.HELDOUT_VALUES["minutes"])
    pattern = heldout_value_pattern()
    for row in rows("calibration.jsonl"):
        for text in user_texts(row["messages"]):
            assert not pattern.search(text), text
    easy = conversations.Generator(seed=200, easy=True)  # the streams train.py trains on
    normal = conversations.Generator(seed=100)
    streams = [easy] * (EASY_POOLS * POOL) + [normal] * (POOLS * POOL)
    for gen in streams:
        c = gen.conversation()
        for text in user_texts(c["messages"]):
            assert not pattern.search(text), text
        for m in [m for m in c["messages"] if m["role"] == "assistant"] + [c["answer"]]:
            for call in m.get("tool_calls", []):
                assert call["function"]["arguments"].get("minutes") not in conversations.HELDOUT_VALUES["minutes"]


@pytest.mark.parametrize("name, count", [("verify.jsonl", 240), ("fresh.jsonl", 120)])
def test_heldout_rows_use_heldout_values(name, count):
    pattern = heldout_value_pattern()
    data = rows(name)
    assert len(data) == count
    for row in data:
        for call in row["expected"]:
            for key, value in call["arguments"].items():
                assert value in conversations.HELDOUT_VALUES[key], (key, value)
        if row["expected"]:
            assert pattern.search(row["messages"][-1]["content"]) or "minutes" in json.dumps(row["expected"])


def test_the_runner_answers_held_out_requests_as_transformers_does():
    """The committed weights through runner/chat.py, runner/gemma.py (fp32 executor) and
    runner/function_calls.py, on the first held-out rows: token for token transformers'
    greedy `generate` on `apply_chat_template`'s ids, and most calls exact (evaluate.py
    scores all 240: 0.908, recipes/demo-gemma/README.md; 23 of these 24)."""
    if not (DEMO / "model.safetensors").exists():
        pytest.skip("no trained weights")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from runner.checkpoint import Checkpoint
    from runner.gemma import Gemma
    from runner.generate import Sampler, generate
    from runner.lm_head import FloatHead
    from runner.nn import float_linear

    config = GemmaConfig.from_dict(json.loads((DEMO / "config.json").read_text()))
    checkpoint = Checkpoint(DEMO)
    checkpoint.require(tensor_shapes(config))
    weights = {k: checkpoint[k] for k in checkpoint.keys()}
    model, head = Gemma(config, weights, float_linear(weights)), FloatHead(checkpoint, config.vocab_size)
    reference = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO)
    chat = Chat.from_dir(DEMO)
    stop = stop_ids(chat.tokenizer, config.eos_token_id, parallel=True)
    rows_ = rows("verify.jsonl")[:HELD_OUT_ROWS]
    right = 0
    for row in rows_:
        prompt = chat.encode(row["messages"], row["tools"])
        tokens = [s.token for s in generate(model, head, prompt, 48, Sampler(), stop)]
        ids = tokenizer.apply_chat_template(row["messages"], tools=row["tools"], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                                     eos_token_id=sorted(stop), pad_token_id=0)
        assert list(ids) == prompt and out[0, len(ids):].tolist() == tokens, row["messages"][-1]
        answer = parse_answer(chat.tokenizer.decode(tokens, skip_special_tokens=True), row["tools"])
        right += answer.calls == row["expected"] and not answer.malformed
    assert right >= HELD_OUT_ROWS * 5 // 6, right


def test_the_int8_bundle_answers_held_out_requests_as_the_float_model_does(tmp_path):
    """The shipped recipe builds the committed weights (cpu flavor), and `doit verify`
    answers held-out requests with the float model and with the int8 bundle (emulate)."""
    if not (DEMO / "model.safetensors").exists():
        pytest.skip("no trained weights")
    subset = tmp_path / "held-out.jsonl"
    subset.write_text("".join((DEMO / "verify.jsonl").read_text().splitlines(keepends=True)[:HELD_OUT_ROWS]))
    artifacts = tmp_path / "artifacts"
    doit(artifacts, "recipe=recipes/demo-gemma.yaml", "flavors=[cpu]", "verify",
         f"verify={{conversations: {subset}, synthetic: 1, tokens: 16, greedy_steps: 0, compare: false}}")
    m = json.loads((artifacts / "bundles" / "demo-gemma" / "report.json").read_text())["metrics"]
    assert m["call_exact_match_float"] >= 0.83, m  # 0.908 on all 240, 23 of these 24 (recipes/demo-gemma/README.md)
    assert m["call_agreement"] >= 0.95 and m["call_exact_match_int8"] >= m["call_exact_match_float"] - 0.05, m
