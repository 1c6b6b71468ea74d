"""`runner call` (issue #16): tools and a request in, the rendered prompt exactly as
transformers' apply_chat_template gives it, decoding to a Function-Gemma stop token, the
turn parsed. The model here has random weights in the demo Function-Gemma's layout and
tokenizer (recipes/demo-gemma/), so these tests hold the plumbing, not the answer: whatever
the model says comes back as calls, text or malformed calls, never a traceback. The trained
demo's answers are tests/test_demo_gemma.py's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from runner.function_calls import parse_answer
from runner.gemma import GemmaConfig, tensor_shapes

from .conftest import GENERATED_GEMMA, ROOT, doit, runner

DEMO = ROOT / "recipes" / "demo-gemma"
TOOLS = DEMO / "tools.json"


@pytest.fixture(scope="module")
def fg_bundle(tmp_path_factory):
    """A bundle of a random-weight Gemma-3 with the demo Function-Gemma's config, tokenizer
    and chat template, built by doit with the cpu flavor."""
    root = tmp_path_factory.mktemp("fg")
    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEMO / name, checkpoint / name)
    config = GemmaConfig.from_dict(json.loads((DEMO / "config.json").read_text()))
    rng = np.random.default_rng(0)
    weights = {name: (np.zeros(shape, np.float32) if name.endswith("norm.weight")
                      else (rng.standard_normal(shape) * 0.05).astype(np.float32))
               for name, shape in tensor_shapes(config).items()}
    save_file(weights, str(checkpoint / "model.safetensors"))
    (checkpoint / "prompts.txt").write_text("set a timer for five minutes\nwhat is the weather in Lisbon\n")
    (checkpoint / "heldout-prompts.txt").write_text("turn on the kitchen light\n")
    artifacts = root / "artifacts"
    out = doit(artifacts, *FG_RECIPE, f"checkpoint={checkpoint}").stdout
    assert ".  bundle" in out, out
    return artifacts / "bundles" / "fg"


# k_proj and v_proj (256 -> 64) run on 256x256 templates, as the demo's do on the one compiled
# one; calibration renders the demo's conversations through the chat template.
FG_RECIPE = ("recipe=recipes/demo-gemma.yaml", "generate=null", "name=fg", "flavors=[cpu]", "pad_outputs=256",
             f"calibration={{prompts: prompts.txt, conversations: {DEMO / 'calibration.jsonl'}, synthetic: 2}}",
             "verify={prompts: heldout-prompts.txt, synthetic: 4, tokens: 48, greedy_steps: 16}")


def test_the_prompt_is_transformers_own_and_the_answer_is_parsed(fg_bundle, tmp_path):
    transformers = pytest.importorskip("transformers")
    request = "Set a timer for 10 minutes"
    run = runner("call", fg_bundle, request, "--tools", TOOLS, "--steps", "12", "--backend", "cpu", "--json")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    result = json.loads(run.stdout)
    tools = json.loads(TOOLS.read_text())
    reference = transformers.AutoTokenizer.from_pretrained(fg_bundle)
    expected = reference.apply_chat_template([{"role": "user", "content": request}], tools=tools,
                                             add_generation_prompt=True, tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]  # transformers 5: a BatchEncoding
    assert result["prompt_tokens"] == list(expected)
    assert 1 <= len(result["tokens"]) <= 12 and result["stopped"] in ("stop", "steps")
    assert set(result) >= {"calls", "text", "malformed", "prompt_tokens", "tokens", "stopped", "setup_ms",
                           "prefill_ms", "ms_per_token"}
    assert isinstance(result["calls"], list) and all(set(c) == {"name", "arguments"} for c in result["calls"])

    # A conversation file and a request after it: the same ids as transformers gives.
    conversation = [{"role": "user", "content": "Is it raining in Porto?"},
                    {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                        "name": "get_weather", "arguments": {"city": "Porto"}}}]},
                    {"role": "tool", "name": "get_weather", "content": {"weather": "rain"}}]
    (tmp_path / "conversation.json").write_text(json.dumps(conversation))
    run = runner("call", fg_bundle, "--messages", tmp_path / "conversation.json", "--tools", TOOLS, "--steps", "4",
                 "--backend", "cpu", "--json")
    assert run.returncode == 0, run.stderr
    expected = reference.apply_chat_template(conversation, tools=tools, add_generation_prompt=True, tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]  # transformers 5: a BatchEncoding
    assert json.loads(run.stdout)["prompt_tokens"] == list(expected)


def test_the_request_may_come_after_the_options(fg_bundle):
    """`call BUNDLE --tools FILE REQUEST`, as the issue and --help write it, is the same call
    as `call BUNDLE REQUEST --tools FILE`; a second stray word is still an error."""
    first = runner("call", fg_bundle, "--tools", TOOLS, "--steps", "3", "--backend", "emulate", "--json", "hello there")
    second = runner("call", fg_bundle, "hello there", "--tools", TOOLS, "--steps", "3", "--backend", "emulate", "--json")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert json.loads(first.stdout)["prompt_tokens"] == json.loads(second.stdout)["prompt_tokens"]
    stray = runner("call", fg_bundle, "hello", "--tools", TOOLS, "again")
    assert stray.returncode == 2 and "unrecognized arguments: again" in stray.stderr


@pytest.mark.parametrize("content, message", [
    ("{not json", "tools.json: not valid JSON"),
    ('{"type": "function"}', "tools.json: tools are a JSON list of objects"),
])
def test_a_bad_tools_file_is_one_line_naming_it(fg_bundle, tmp_path, content, message):
    bad = tmp_path / "tools.json"
    bad.write_text(content)
    run = runner("call", fg_bundle, "hello", "--tools", bad, "--backend", "emulate")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and message in line, line


def test_a_bundle_without_a_chat_template_says_so(tmp_path):
    """The generated demo Gemma has a tokenizer and no chat template."""
    artifacts = tmp_path / "artifacts"
    doit(artifacts, *GENERATED_GEMMA, "flavors=[]")
    run = runner("call", artifacts / "bundles" / "demo-gemma", "hello", "--backend", "emulate")
    assert run.returncode == 2 and "no chat template in the bundle" in run.stderr and "Traceback" not in run.stderr


def test_verify_answers_held_out_conversations_as_transformers_and_the_runner_do(fg_bundle, tmp_path):
    """`doit verify` with `verify.conversations`: each request answered greedily by float and
    by the bundle, parsed and scored. The float answers must be transformers' own (greedy
    generate on apply_chat_template's ids), the int8 ones `runner call`'s on the emulate
    backend, and each exact-match flag the comparison with the row's expected calls."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    rows = [json.loads(line) for line in (DEMO / "verify.jsonl").read_text().splitlines()[:3]]
    checkpoint = fg_bundle.parents[2] / "checkpoint"
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<start_function_response>", "<end_of_turn>")] + [1, 5]
    reference = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["messages"], tools=row["tools"], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=stop,
                                 pad_token_id=0)
        reference.append(parse_answer(tokenizer.decode(out[0, len(ids):]), row["tools"]))
    rows[0]["expected"] = reference[0].calls  # right by construction
    rows[1]["expected"] = [{"name": "set_timer", "arguments": {"minutes": 12345}}]  # wrong by construction
    conversations = tmp_path / "held-out.jsonl"
    conversations.write_text("".join(json.dumps(r) + "\n" for r in rows))

    artifacts = fg_bundle.parents[1]
    doit(artifacts, *FG_RECIPE, f"checkpoint={checkpoint}", "verify",
         f"verify={{conversations: {conversations}, synthetic: 1, tokens: 16, greedy_steps: 0, compare: false}}")
    report = json.loads((fg_bundle / "report.json").read_text())
    calls = report["calls"]
    assert [c["float"] for c in calls] == [a.to_json() for a in reference]
    assert [c["exact_float"] for c in calls][:2] == [not reference[0].malformed, False]
    assert report["metrics"]["call_exact_match_float"] == pytest.approx(np.mean([c["exact_float"] for c in calls]))
    assert report["metrics"]["call_agreement"] == pytest.approx(np.mean([c["agree"] for c in calls]))
    assert report["inputs"]["conversations"] == 3

    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps(rows[2]["messages"]))
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(rows[2]["tools"]))
    run = runner("call", fg_bundle, "--messages", messages, "--tools", tools, "--backend", "emulate",
                 "--lm-head", "cpu", "--parallel", "--steps", "64", "--json")
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert {k: answer[k] for k in ("calls", "text", "malformed")} == calls[2]["int8"]


def test_padded_layers_run_on_wider_templates_and_give_their_own_outputs(fg_bundle):
    """`pad_outputs: 256`: k_proj (256 -> 64) runs on a 256x256 template with zero rows; the
    runner hands back its 64 outputs, the same from the emulator and from TFLite's kernels
    (the cpu flavor), and close to the float layer."""
    from runner.bundle import Bundle
    from runner.checkpoint import Checkpoint
    from runner.executors import make_linear

    bundle = Bundle.open(fg_bundle)
    name = "model.layers.0.self_attn.k_proj"
    layer = next(layer for layer in bundle.layers if layer.name == name)
    assert (layer.n_in, layer.n_out, layer.outputs) == (256, 256, 64)
    x = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    emulate, cpu = make_linear(bundle, "emulate")(name, x), make_linear(bundle, "cpu")(name, x)
    assert emulate.shape == cpu.shape == (5, 64)
    np.testing.assert_array_equal(emulate, cpu)
    ref = x @ Checkpoint(fg_bundle.parents[2] / "checkpoint")[f"{name}.weight"].T
    assert np.linalg.norm(emulate - ref) / np.linalg.norm(ref) < 0.03


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not JSON"),
    ('{"tools": []}', 'needs "messages"'),
    ('{"messages": [{"role": "user", "content": "hi"}], "tools": {"a": 1}}', '"tools" must be a list'),
    ('{"messages": [{"role": "user", "content": "hi"}], "expected": [{"arguments": {}}]}', 'needs "expected"'),
])
def test_a_bad_conversation_line_names_the_file_and_line(tmp_path, line, problem):
    from prepare.families.gemma import read_conversations
    from prepare.recipe import RecipeError

    path = tmp_path / "held-out.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}], "expected": []}\n\n' + line + "\n")
    with pytest.raises(RecipeError) as e:
        read_conversations(path, expected=True)
    assert str(e.value).startswith(f"{path}:3: {problem}")


def test_the_shipped_conversations_are_read_and_held_out():
    """recipes/calibration/function-calling*.jsonl (the 270M recipe's) and the demo's: every
    line a conversation; no held-out request is a calibration one."""
    from prepare.families.gemma import read_conversations

    for calibration, held_out in ((ROOT / "recipes/calibration/function-calling.jsonl",
                                   ROOT / "recipes/calibration/function-calling-verify.jsonl"),
                                  (DEMO / "calibration.jsonl", DEMO / "verify.jsonl")):
        seen = {m["content"] for r in read_conversations(calibration) for m in r["messages"] if m["role"] == "user"}
        rows = read_conversations(held_out, expected=True)
        assert len(rows) >= 48 and not seen & {r["messages"][-1]["content"] for r in rows}
        assert any(r["expected"] for r in rows) and any(not r["expected"] for r in rows)


@pytest.mark.parametrize("tools, messages, where", [
    ([{"type": "function", "function": {"description": "no name"}}], None, 'tools.json: tool 0: no "name"'),
    (None, [{"role": "wizard", "content": "hi"}], "conversation.json: message 0: role 'wizard'"),
])
def test_a_mistake_in_the_users_files_names_that_file_not_the_template(fg_bundle, tmp_path, tools, messages, where):
    args = []
    if tools is not None:
        (tmp_path / "tools.json").write_text(json.dumps(tools))
        args += ["--tools", tmp_path / "tools.json"]
    if messages is not None:
        (tmp_path / "conversation.json").write_text(json.dumps(messages))
        args += ["--messages", tmp_path / "conversation.json"]
    run = runner("call", fg_bundle, *args, *(["hello"] if messages is None else []), "--backend", "emulate")
    line = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and where in line and "tokenizer_config" not in line, run.stderr


def test_a_call_without_tools_says_the_model_can_only_answer_in_text(fg_bundle, tmp_path):
    (tmp_path / "none.json").write_text("[]")
    run = runner("call", fg_bundle, "set a timer", "--tools", tmp_path / "none.json", "--steps", "3",
                 "--backend", "emulate")
    assert run.returncode == 0 and "note: no tools given" in run.stderr, run.stderr


def test_the_recipes_tools_travel_in_the_bundle_and_serve_when_none_are_given(fg_bundle, tmp_path):
    """demo-gemma.yaml names `tools:`; the bundle carries them (listed in the manifest, so
    `runner check` and deploy see them) and `runner call` renders them when given no --tools:
    the same prompt as --tools with the same file, and a longer one than no tools at all."""
    manifest = json.loads((fg_bundle / "manifest.json").read_text())
    assert manifest["tools"]["path"] == "tools.json"
    assert json.loads((fg_bundle / "tools.json").read_text()) == json.loads(TOOLS.read_text())
    (tmp_path / "none.json").write_text("[]")
    prompts = {}
    for name, args in (("bundle's", []), ("given", ["--tools", TOOLS]), ("none", ["--tools", tmp_path / "none.json"])):
        run = runner("call", fg_bundle, "set a timer", *args, "--steps", "2", "--backend", "emulate", "--json")
        assert run.returncode == 0, run.stderr
        prompts[name] = json.loads(run.stdout)["prompt_tokens"]
        assert ("(the bundle's; --tools FILE gives others)" in run.stderr) == (name == "bundle's"), run.stderr
    assert prompts["bundle's"] == prompts["given"] and len(prompts["given"]) > len(prompts["none"]) + 100
    check = runner("check", fg_bundle, "--json")
    assert check.returncode == 0, check.stderr
    (fg_bundle / "tools.json").write_text(TOOLS.read_text() + " ")  # a changed file is found by check
    try:
        check = runner("check", fg_bundle)
        assert check.returncode != 0 and "tools" in check.stdout + check.stderr, check.stdout + check.stderr
    finally:
        shutil.copyfile(TOOLS, fg_bundle / "tools.json")


@pytest.mark.parametrize("tools, needle", [
    ("missing.json", "key 'tools': {checkpoint}/missing.json does not exist"),
    ("bad.json", "key 'tools': {checkpoint}/bad.json: tool 0: no \"name\""),
])
def test_a_bad_tools_key_is_one_line_before_any_work(tmp_path, tools, needle):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (checkpoint / name).symlink_to(DEMO / name)
    (checkpoint / "bad.json").write_text('[{"type": "function", "function": {"description": "no name"}}]')
    run = doit(tmp_path / "artifacts", "recipe=recipes/demo-gemma.yaml", "generate=null", f"checkpoint={checkpoint}",
               f"tools={tools}", check=False)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert needle.format(checkpoint=checkpoint) in lines[0] and "recipes/demo-gemma.yaml" in lines[0], lines


def test_tools_are_for_a_model_that_calls_functions(tmp_path):
    run = doit(tmp_path / "artifacts", "recipe=recipes/demo-clip.yaml", f"tools={TOOLS}", check=False)
    assert run.returncode == 2 and "key 'tools' is for a model that calls functions" in run.stderr, run.stderr