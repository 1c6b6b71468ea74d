"""runner/chat.py against transformers' own `apply_chat_template`, token for token.

The reference is transformers rendering the same template for the same conversation:
the demo Function-Gemma's template and tokenizer (recipes/demo-gemma) for conversations
with tools, multi-turn tool calls and responses, system turns and none; and small
templates written here to exercise what the sandbox provides (the globals and filters
transformers defines, whitespace control, loop controls, special-token variables,
template files and named templates)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runner.chat import Chat, ChatError, ChatTemplate

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo-gemma"
TOOLS = json.loads((DEMO / "tools.json").read_text())
SYSTEM = "You are a model that can do function calling with the following functions"


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


NESTED_TOOL = {"type": "function", "function": {
    "name": "plan_trip", "description": "Plan a trip, with \"quotes\", {braces} and colons: yes",
    "parameters": {"type": "object", "required": ["stops"], "properties": {
        "stops": {"type": "array", "description": "places", "items": {"type": "string"}},
        "budget": {"type": "number"}, "nights": {"type": "integer"}, "pets": {"type": "boolean"},
        "mode": {"type": "string", "enum": ["car", "train"]},
        "hotel": {"type": "object", "properties": {"stars": {"type": "integer"}, "name": {"type": "string"}},
                  "required": ["stars"]}}}}}

CONVERSATIONS = {
    "tools, one request": (TOOLS, [
        {"role": "developer", "content": SYSTEM},
        {"role": "user", "content": "what's the weather like in Lisbon?"}]),
    "tools, no system turn": (TOOLS[:2], [{"role": "user", "content": "set a timer for 5 minutes"}]),
    "multi-turn with a call and its response": (TOOLS, [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "text Maria that I'm running late"},
        {"role": "assistant", "content": None,
         "tool_calls": [call("send_message", to="Maria", text="I'm running late, {sorry}: 5, ok")]},
        {"role": "tool", "name": "send_message", "content": {"status": "sent", "id": 17, "read": False}},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "switch off the kitchen lights"}]),
    "ends with a call": (TOOLS, [
        {"role": "user", "content": "lights off in the den and play Queen"},
        {"role": "assistant", "tool_calls": [call("turn_off_light", room="den"), call("play_music", artist="Queen")]}]),
    "ends with tool responses": (TOOLS, [
        {"role": "user", "content": "weather in Oslo"},
        {"role": "assistant", "tool_calls": [call("get_weather", city="Oslo")]},
        {"role": "tool", "name": "get_weather", "content": "4 degrees, snow"}]),
    "system turn, no tools": (None, [
        {"role": "developer", "content": "  Answer briefly.  "},
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image"}]},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "thanks"}]),
    "no tools, no system": (None, [{"role": "user", "content": "héllo — ünïcode ✓ <b>&amp;</b>"}]),
    "nested schema and arguments": ([NESTED_TOOL], [
        {"role": "user", "content": "plan it"},
        {"role": "assistant", "tool_calls": [call("plan_trip", stops=["Porto", "Vigo, ES"], budget=1250.5, nights=3,
                                                  pets=True, mode="train", hotel={"stars": 4, "name": "A:B"})]},
        {"role": "tool", "name": "plan_trip", "content": {"ok": True, "legs": [1, 2.5, None]}},
        {"role": "assistant", "content": "Planned."}]),
}


@pytest.fixture(scope="module")
def reference():
    return transformers.AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def chat():
    return Chat.from_dir(DEMO)


def hf_ids(tokenizer, messages, tools, **kwargs):
    kwargs.setdefault("add_generation_prompt", True)
    return list(tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False, **kwargs))


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_demo_template_gives_transformers_token_ids(name, generation_prompt, chat, reference):
    tools, messages = CONVERSATIONS[name]
    expected = hf_ids(reference, messages, tools, add_generation_prompt=generation_prompt)
    assert chat.encode(messages, tools, add_generation_prompt=generation_prompt) == expected
    # the early length check never refuses a prompt that fits, even one that fills its room exactly
    assert chat.encode(messages, tools, add_generation_prompt=generation_prompt, most_tokens=len(expected)) == expected
    text = reference.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=generation_prompt)
    assert chat.template.render(messages, tools, generation_prompt) == text


def test_the_function_gemma_format(chat):
    """What the demo template writes is Function-Gemma's published format."""
    tools, messages = CONVERSATIONS["multi-turn with a call and its response"]
    text = chat.template.render(messages, tools)
    assert text.startswith("<bos><start_of_turn>developer\n" + SYSTEM + "<start_function_declaration>declaration:"
                           "set_timer{description:<escape>Start a countdown timer<escape>,parameters:{properties:"
                           "{minutes:{type:<escape>INTEGER<escape>}},required:[<escape>minutes<escape>],"
                           "type:<escape>OBJECT<escape>}}<end_function_declaration>")
    assert ("<start_of_turn>model\n<start_function_call>call:send_message{text:<escape>I'm running late, {sorry}: 5, "
            "ok<escape>,to:<escape>Maria<escape>}<end_function_call><start_function_response>response:send_message"
            "{id:17,read:false,status:<escape>sent<escape>}<end_function_response>Done.<end_of_turn>\n") in text
    assert text.endswith("<start_of_turn>user\nswitch off the kitchen lights<end_of_turn>\n<start_of_turn>model\n")
    assert chat.template.render(*reversed(CONVERSATIONS["ends with a call"])).endswith(
        "<end_function_call><start_function_response>")


def test_the_demo_prompt_tokens(chat):
    """The control tokens are single tokens with Gemma's ids, and the text after them
    encodes alone (a request's words are the same tokens in the call)."""
    tok = chat.tokenizer
    ids = chat.encode([{"role": "user", "content": "weather in Lisbon"}], TOOLS[1:2])
    assert ids[:3] == [2, 4, tok.token_to_id("developer")]
    assert ids[-3:] == [4, tok.token_to_id("model"), tok.token_to_id("\u010a")]  # <start_of_turn>model\n
    lisbon = tok.encode("Lisbon", add_special_tokens=False).ids
    text = chat.template.render([{"role": "user", "content": "weather in Lisbon?"},
                                 {"role": "assistant", "tool_calls": [call("get_weather", city="Lisbon")]}], TOOLS)
    encoded = tok.encode(text, add_special_tokens=False).ids
    assert _count(encoded, lisbon) == 2


def _count(seq, sub):
    return sum(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_keyword_arguments_override_special_tokens(chat, reference):
    messages = CONVERSATIONS["no tools, no system"][1]
    assert chat.encode(messages, bos_token="") == hf_ids(reference, messages, None, bos_token="")
    assert chat.encode(messages)[0] == 2 and chat.encode(messages, bos_token="")[0] != 2


# --- what the sandbox provides, on templates written for it ---------------------------------

FEATURES = """{%- set ns = namespace(n=0, names=[]) -%}
{{ bos_token }}[{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ image_token }}|{{ extra_token }}]
{% for m in messages %}
    {% if loop.index > 3 %}{% break %}{% endif %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ m.role }}>{{ m.content | tojson }}</{{ m.role }}>
{% endfor %}
n={{ ns.n }} year={{ strftime_now('%Y') }} d={{ dict(a=1, b=[2, 3]) | tojson(indent=2, sort_keys=true) }}
keys={{ dict.fromkeys(['x', 'y']) | tojson }} tools={{ tools | tojson(separators=(',', ':')) }}
documents={{ documents is none }} gen={{ add_generation_prompt }}
{% generation %}tracked {{ 1 + 1 }}{% endgeneration %}
"""


def write_checkpoint(directory: Path, template=None, files: dict | None = None, **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO / "tokenizer.json", directory / "tokenizer.json")
    base = json.loads((DEMO / "tokenizer_config.json").read_text())
    base.pop("chat_template")
    if template is not None:
        base["chat_template"] = template
    base.update(config)
    (directory / "tokenizer_config.json").write_text(json.dumps(base))
    for name, text in (files or {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


def both(directory: Path, messages, tools=None, **kwargs):
    ours = Chat.from_dir(directory)
    ref = transformers.AutoTokenizer.from_pretrained(directory)
    kwargs.setdefault("add_generation_prompt", True)
    text = ref.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
    assert ours.template.render(messages, tools, **kwargs) == text
    assert ours.encode(messages, tools, **kwargs) == hf_ids(ref, messages, tools, **kwargs)
    return text


def test_globals_filters_whitespace_and_loop_controls(tmp_path):
    # model-specific special tokens the vocabulary has (ids 9 and 10 are function tokens)
    d = write_checkpoint(tmp_path / "c", FEATURES, image_token="<start_function_response>",
                         extra_special_tokens={"extra_token": "<end_function_response>"})
    messages = [{"role": "user", "content": "a <b> & 'c' \"d\" é ✓"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "ok", "tool_calls": None}, {"role": "user", "content": "more"}]
    text = both(d, messages, [{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert "[<eos>|<pad>|<unk>|<start_function_response>|<end_function_response>]" in text
    assert '"a <b> & \'c\' \\"d\\" é ✓"' in text  # tojson without HTML escaping, non-ASCII kept
    assert "n=2 " in text and "tracked 2" in text and "documents=True" in text
    assert "<assistant>\"ok\"</assistant>" in text and "more" not in text  # {% break %} after three
    both(d, messages, None, add_generation_prompt=False)


def test_special_tokens_named_in_the_config(tmp_path):
    """A token the config names and the vocabulary has is matched whole, as transformers
    does; one the vocabulary lacks (transformers would append a new id) is an error."""
    d = write_checkpoint(tmp_path / "vocab", "{{ messages[0].content }}", sep_token="weather")
    both(d, [{"role": "user", "content": "weatherweathers weather"}])
    assert Chat.from_dir(d).encode([{"role": "user", "content": "weathers"}])[0] == \
        Chat.from_dir(d).tokenizer.token_to_id("weather")
    d = write_checkpoint(tmp_path / "new", "{{ image_token }} {{ messages[0].content }}", image_token="<img>")
    with pytest.raises(ChatError, match="tokenizer_config.json names '<img>' as a special token"):
        Chat.from_dir(d).encode([{"role": "user", "content": "x"}])


def test_chat_template_file_wins_and_named_templates(tmp_path):
    d = write_checkpoint(tmp_path / "c", "CONFIG {{ messages[0].content }}",
                         files={"chat_template.jinja": "FILE {{ messages[0].content }}"})
    assert both(d, [{"role": "user", "content": "x"}]) == "FILE x"
    d = write_checkpoint(tmp_path / "named", [{"name": "default", "template": "DEFAULT"},
                                              {"name": "tool_use", "template": "TOOLS {{ tools | length }}"}])
    assert both(d, [{"role": "user", "content": "x"}]) == "DEFAULT"
    assert both(d, [{"role": "user", "content": "x"}], TOOLS) == "TOOLS 6"
    d = write_checkpoint(tmp_path / "files", None, files={"chat_template.jinja": "MAIN",
                                                          "additional_chat_templates/tool_use.jinja": "TOOL"})
    assert both(d, [{"role": "user", "content": "x"}]) == "MAIN"
    assert both(d, [{"role": "user", "content": "x"}], TOOLS) == "TOOL"


def test_values_are_rebuilt_from_plain_types():
    np = pytest.importorskip("numpy")
    t = ChatTemplate("{{ messages[0].content }} {{ messages[0].n + 1 }} {{ messages[0].flag }} {{ messages[0].obj }}")
    text = t.render([{"role": "user", "content": "hi", "n": np.int64(4), "flag": np.bool_(False), "obj": object()}])
    assert text == "hi 5 False <object>"


# --- errors --------------------------------------------------------------------------------

def test_template_errors_are_one_line_chat_errors_naming_the_file(tmp_path, reference):
    d = write_checkpoint(tmp_path / "syntax", "{% for m in messages %}{{ m.content }")
    with pytest.raises(ChatError, match=r"tokenizer_config\.json: chat template line 1: ") as e:
        Chat.from_dir(d).encode([{"role": "user", "content": "x"}])
    assert "\n" not in str(e.value)
    d = write_checkpoint(tmp_path / "raise", None, files={"chat_template.jinja": "{{ raise_exception('no ' + x) }}"})
    with pytest.raises(ChatError, match=r"chat_template\.jinja: chat template: 'x' is undefined"):
        Chat.from_dir(d).encode([{"role": "user", "content": "x"}])
    d = write_checkpoint(tmp_path / "raise2", "{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(ChatError, match=r"tokenizer_config\.json: chat template: Conversation roles must alternate$"):
        Chat.from_dir(d).encode([{"role": "user", "content": "x"}])
    with pytest.raises(jinja2.TemplateError):  # transformers refuses the same
        transformers.AutoTokenizer.from_pretrained(d).apply_chat_template([{"role": "user", "content": "x"}])


def test_the_sandbox_refuses_escapes(tmp_path):
    for template in ("{{ messages.__class__.__mro__ }}", "{{ ''.__class__.__subclasses__() }}",
                     "{% set ns = namespace() %}{% set ns._x = 1 %}", "{{ messages.append(1) }}"):
        d = write_checkpoint(tmp_path / str(abs(hash(template))), template)
        with pytest.raises(ChatError, match="tokenizer_config.json: chat template"):
            Chat.from_dir(d).encode([{"role": "user", "content": "x"}])


def test_bad_conversations(chat):
    for messages, problem in (([], "non-empty list"), ("hello", "non-empty list"),
                              ([{"role": "user", "content": "x"}, "y"], "message 1 is a str")):
        with pytest.raises(ChatError, match=problem):
            chat.encode(messages)
    with pytest.raises(ChatError, match="tools must be a list"):
        chat.encode([{"role": "user", "content": "x"}], tools={"name": "f"})
    # the demo template's own checks, through raise_exception
    with pytest.raises(ChatError, match="unexpected role 'system'"):
        chat.encode([{"role": "user", "content": "x"}, {"role": "system", "content": "late"}])
    with pytest.raises(ChatError, match="must be followed by its tool response"):
        chat.encode([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call("f")]},
                     {"role": "user", "content": "y"}])
    with pytest.raises(ChatError, match="tool message must follow"):
        chat.encode([{"role": "user", "content": "x"}, {"role": "tool", "name": "f", "content": "r"}])
    assert issubclass(ChatError, ValueError)


def test_missing_or_broken_template_files(tmp_path):
    d = write_checkpoint(tmp_path / "none")
    with pytest.raises(ChatError, match="no chat template"):
        ChatTemplate.from_dir(d)
    d = write_checkpoint(tmp_path / "bad", 42)
    with pytest.raises(ChatError, match="'chat_template' must be a string"):
        ChatTemplate.from_dir(d)
    d = write_checkpoint(tmp_path / "named", [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}])
    with pytest.raises(ChatError, match="none named 'default'"):
        ChatTemplate.from_dir(d).render([{"role": "user", "content": "x"}])
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ChatError, match="tokenizer_config.json: not valid JSON"):
        ChatTemplate.from_dir(tmp_path / "json")
    d = write_checkpoint(tmp_path / "binary", None)
    (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ChatError, match="chat_template.jinja: not UTF-8"):
        ChatTemplate.from_dir(d)
