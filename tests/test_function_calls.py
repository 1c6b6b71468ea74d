"""runner/function_calls.py: Function-Gemma answers to typed JSON calls, and the stop rule.

The round trips go through the demo chat template's own formatting of tool calls (the
text the model is trained to write), so the parser reads what the template writes, not
what this file thinks it writes."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest

from runner.chat import Chat
from runner.function_calls import Answer, Malformed, parse_answer, parse_call, stop_ids

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo-gemma"
TOOLS = json.loads((DEMO / "tools.json").read_text())

TYPED_TOOL = {"type": "function", "function": {
    "name": "book", "description": "every JSON type",
    "parameters": {"type": "object", "required": ["where"], "properties": {
        "where": {"type": "string"}, "nights": {"type": "integer"}, "price": {"type": "number"},
        "pets": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}},
        "counts": {"type": "array", "items": {"type": "integer"}},
        "room": {"type": "object", "properties": {"floor": {"type": "integer"}, "view": {"type": "string"},
                                                  "beds": {"type": "array", "items": {"type": "number"}}}},
        "note": {"type": ["string", "null"]}, "mode": {"type": "string", "enum": ["car", "train"]},
        "anything": {}}}}}
ALL_TOOLS = TOOLS + [TYPED_TOOL]


@pytest.fixture(scope="module")
def chat():
    return Chat.from_dir(DEMO)


def model_turn(chat, calls) -> str:
    """What the template writes for the model's turn holding `calls` (the text a trained
    model produces), and decoded back from its tokens."""
    messages = [{"role": "user", "content": "do it"}]
    prompt = chat.template.render(messages, ALL_TOOLS)
    full = chat.template.render(messages + [{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}], ALL_TOOLS)
    assert full.startswith(prompt)
    ids = chat.tokenizer.encode(full[len(prompt):], add_special_tokens=False).ids
    return chat.tokenizer.decode(ids, skip_special_tokens=True)


TRICKY = ["Lisbon", "I'm running late, sorry: {5} [ok]", "a,b:c{d}e[f]g", "  spaced  ", "", "ünïcode ✓ 😀",
          "true", "5", "null", "call:x{y:z}", "}<end_function_call> is text here"]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_of_strings_with_syntax_inside(chat, text):
    calls = [("send_message", {"to": "Maria", "text": text})]
    answer = parse_answer(model_turn(chat, calls), ALL_TOOLS)
    if "<end_function_call>" in text:  # the call ends at the first one: the rest is not a call
        assert answer.calls == [] and answer.malformed
        return
    assert answer.malformed == [] and answer.text == ""
    assert answer.calls == [{"name": "send_message", "arguments": {"to": "Maria", "text": text}}]


def test_round_trip_of_every_type_nested(chat):
    arguments = {"where": "Porto, {PT}", "nights": 3, "price": 99.5, "pets": False, "tags": ["a,b", "c:d", ""],
                 "counts": [1, -2, 30], "room": {"floor": 2, "view": "sea", "beds": [1.0, 2.5]},
                 "note": None, "mode": "train", "anything": {"x": [True, None, "s", 1.5]}}
    answer = parse_answer(model_turn(chat, [("book", arguments)]), ALL_TOOLS)
    assert answer.malformed == []
    assert answer.calls == [{"name": "book", "arguments": arguments}]
    got = answer.calls[0]["arguments"]
    assert type(got["nights"]) is int and type(got["price"]) is float and type(got["pets"]) is bool
    assert type(got["room"]["beds"][0]) is float  # 1.0 written as 1.0, and a number is a float


def test_numbers_follow_the_schema_not_the_spelling():
    answer = parse_answer("<start_function_call>call:book{where:<escape>x<escape>,nights:<escape>4<escape>,"
                          "price:7,counts:[1,2.0]}<end_function_call>", ALL_TOOLS)
    assert answer.calls == [{"name": "book", "arguments": {"where": "x", "nights": 4, "price": 7.0, "counts": [1, 2]}}]
    assert type(answer.calls[0]["arguments"]["price"]) is float
    assert all(type(c) is int for c in answer.calls[0]["arguments"]["counts"])


@pytest.mark.parametrize("seed", range(20))
def test_random_round_trips(chat, seed):
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " ,:{}[]'\"-_.!?éß"

    def text():
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20))).strip() or "x"

    calls = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            calls.append(("book", {"where": text(), "nights": rng.randint(-5, 10 ** 6),
                                   "price": round(rng.uniform(-1e3, 1e3), 3), "pets": rng.random() < 0.5,
                                   "tags": [text() for _ in range(rng.randint(0, 3))],
                                   "room": {"floor": rng.randint(0, 9), "view": text()}}))
        else:
            tool = rng.choice(TOOLS)["function"]
            props = tool["parameters"]["properties"]
            calls.append((tool["name"], {k: rng.randint(1, 500) if v["type"] == "integer" else text()
                                         for k, v in props.items()}))
    answer = parse_answer(model_turn(chat, calls), ALL_TOOLS)
    assert answer.malformed == []
    assert answer.calls == [{"name": n, "arguments": a} for n, a in calls]


def test_several_calls_are_a_list_in_order_and_text_is_text():
    text = ("<start_function_call>call:turn_off_light{room:<escape>kitchen<escape>}<end_function_call>"
            "<start_function_call>call:set_timer{minutes:5}<end_function_call><start_function_response>")
    answer = parse_answer(text, TOOLS)
    assert answer.calls == [{"name": "turn_off_light", "arguments": {"room": "kitchen"}},
                            {"name": "set_timer", "arguments": {"minutes": 5}}]
    assert answer.text == "" and answer.malformed == []
    plain = parse_answer("Sorry, I can't help with that.<end_of_turn>", TOOLS)
    assert plain == Answer(calls=[], text="Sorry, I can't help with that.", malformed=[])
    mixed = parse_answer("Sure. <start_function_call>call:set_timer{minutes:2}<end_function_call> Started.", TOOLS)
    assert mixed.calls == [{"name": "set_timer", "arguments": {"minutes": 2}}] and mixed.text == "Sure.  Started."
    assert mixed.to_json() == {"calls": mixed.calls, "text": "Sure.  Started.", "malformed": []}


def test_without_tools_values_keep_their_written_types():
    answer = parse_answer("<start_function_call>call:anything{a:1,b:-2.5e3,c:true,d:null,e:<escape>7<escape>,"
                          "f:[false,{g:<escape>h<escape>}],i:bare word}<end_function_call>")
    assert answer.calls == [{"name": "anything", "arguments": {"a": 1, "b": -2500.0, "c": True, "d": None, "e": "7",
                                                               "f": [False, {"g": "h"}], "i": "bare word"}}]
    assert parse_call("<start_function_call>call:ping<end_function_call>") == {"name": "ping", "arguments": {}}
    assert parse_call("<start_function_call>call:ping{}<end_function_call>") == {"name": "ping", "arguments": {}}


MALFORMED = {
    "not closed": ("<start_function_call>call:set_timer{minutes:5}", "not closed by <end_function_call>"),
    "escape not closed": ("<start_function_call>call:get_weather{city:<escape>Lis}<end_function_call>",
                          "opened with <escape> is not closed"),
    "unknown function": ("<start_function_call>call:fly{to:<escape>Mars<escape>}<end_function_call>",
                         "unknown function 'fly'"),
    "missing argument": ("<start_function_call>call:send_message{to:<escape>Bo<escape>}<end_function_call>",
                         "missing required argument 'text'"),
    "unknown argument": ("<start_function_call>call:get_weather{city:<escape>A<escape>,when:<escape>now<escape>}"
                         "<end_function_call>", "unknown argument 'when'"),
    "not an integer": ("<start_function_call>call:set_timer{minutes:2.5}<end_function_call>", "not an integer"),
    "not a number": ("<start_function_call>call:set_timer{minutes:<escape>soon<escape>}<end_function_call>",
                     "is not a number"),
    "not a boolean": ("<start_function_call>call:book{where:<escape>x<escape>,pets:<escape>yes<escape>}"
                      "<end_function_call>", "not true or false"),
    "array expected": ("<start_function_call>call:book{where:<escape>x<escape>,tags:<escape>a<escape>}"
                       "<end_function_call>", "is not an array"),
    "object given for a string": ("<start_function_call>call:get_weather{city:{a:1}}<end_function_call>",
                                  "where a string is expected"),
    "null for a string": ("<start_function_call>call:get_weather{city:null}<end_function_call>",
                          "null where string is expected"),
    "boolean for a string": ("<start_function_call>call:get_weather{city:true}<end_function_call>",
                             "where a string is expected"),
    "enum": ("<start_function_call>call:book{where:<escape>x<escape>,mode:<escape>boat<escape>}<end_function_call>",
             "'boat' is not one of"),
    "no call prefix": ("<start_function_call>get_weather{city:<escape>A<escape>}<end_function_call>",
                       "does not start with 'call:'"),
    "no name": ("<start_function_call>call:{city:<escape>A<escape>}<end_function_call>", "no function name"),
    "junk after": ("<start_function_call>call:set_timer{minutes:5}}x<end_function_call>", "after the arguments"),
    "no brace": ("<start_function_call>call:set_timer minutes:5<end_function_call>", "expected '{'"),
    "missing colon": ("<start_function_call>call:set_timer{minutes 5}<end_function_call>", "expected ':'"),
    "missing comma": ("<start_function_call>call:send_message{to:<escape>a<escape> text:<escape>b<escape>}"
                      "<end_function_call>", "expected ',' or '}'"),
    "twice": ("<start_function_call>call:set_timer{minutes:1,minutes:2}<end_function_call>", "given twice"),
    "too deep": ("<start_function_call>call:book{where:<escape>x<escape>,anything:" + "[" * 40 + "]" * 40 +
                 "}<end_function_call>", "nested deeper"),
    "huge integer": ("<start_function_call>call:set_timer{minutes:" + "9" * 5000 + "}<end_function_call>",
                     "out of range"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_calls_are_reported_not_raised(name):
    text, problem = MALFORMED[name]
    answer = parse_answer(text, ALL_TOOLS)
    assert answer.calls == []
    assert len(answer.malformed) == 1
    bad = answer.malformed[0]
    assert isinstance(bad, Malformed) and problem in bad.problem
    assert bad.raw.startswith("<start_function_call>") and bad.raw in text
    assert bad.to_json() == {"raw": bad.raw, "problem": bad.problem}


def test_a_good_call_survives_a_bad_neighbour():
    text = ("<start_function_call>call:set_timer{minutes:x}<end_function_call>"
            "<start_function_call>call:set_timer{minutes:3}<end_function_call>"
            "<start_function_call>call:get_weather{city:<escape>Ri")
    answer = parse_answer(text, TOOLS)
    assert answer.calls == [{"name": "set_timer", "arguments": {"minutes": 3}}]
    assert [m.problem for m in answer.malformed] == ["set_timer.minutes: x is not a number",
                                                     "the call is not closed by <end_function_call>"]
    # an unclosed call followed by another: both seen, the second read
    answer = parse_answer("<start_function_call>call:set_timer{minutes:1"
                          "<start_function_call>call:set_timer{minutes:2}<end_function_call>", TOOLS)
    assert answer.calls == [{"name": "set_timer", "arguments": {"minutes": 2}}] and len(answer.malformed) == 1


@pytest.mark.parametrize("seed", range(5))
def test_any_prefix_or_mutation_never_raises(seed):
    rng = random.Random(seed)
    good = ("<start_function_call>call:book{where:<escape>a,b<escape>,nights:3,tags:[<escape>x<escape>],"
            "room:{floor:1,beds:[1.5]}}<end_function_call><start_function_response>")
    pieces = list(good) + ["<escape>", "<start_function_call>", "<end_function_call>", "{", "}", "[", "]", ",", ":"]
    for cut in range(len(good) + 1):
        assert isinstance(parse_answer(good[:cut], ALL_TOOLS), Answer)
    for _ in range(300):
        text = list(good)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(text))
            text[i:i + rng.randint(0, 3)] = [rng.choice(pieces)]
        answer = parse_answer("".join(text), ALL_TOOLS)
        assert isinstance(answer, Answer)
        for c in answer.calls:
            assert set(c) == {"name", "arguments"}


def test_stop_rule(chat):
    tok = chat.tokenizer
    ids = {name: tok.token_to_id(name) for name in ("<end_function_call>", "<start_function_response>",
                                                    "<end_of_turn>", "<start_function_call>")}
    assert stop_ids(tok, [1]) == {ids["<end_function_call>"], ids["<start_function_response>"], ids["<end_of_turn>"], 1}
    assert stop_ids(tok, [1, 5], parallel=True) == {ids["<start_function_response>"], ids["<end_of_turn>"], 1, 5}
    assert ids["<start_function_call>"] not in stop_ids(tok, [1])
