"""`runner call` (issue #16): tools and a request in, the rendered prompt exactly as
transformers' apply_chat_template gives it, decoding to a Function-Gemma stop token, the
turn parsed. The model here has random weights in the demo Function-Gemma's layout and
tokenizer (recipes/demo-gemma/: the trained weights do not exist yet), so these tests hold
the plumbing, not the answer: whatever the model says comes back as calls, text or
malformed calls, never a traceback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from runner.gemma import GemmaConfig, tensor_shapes

from .conftest import ROOT, doit, runner

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
    out = doit(artifacts, "recipe=recipes/demo-gemma.yaml", f"checkpoint={checkpoint}", "generate=null", "name=fg",
               "flavors=[cpu]").stdout
    assert ".  bundle" in out, out
    return artifacts / "bundles" / "fg"


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
    doit(artifacts, "recipe=recipes/demo-gemma.yaml", "flavors=[]")
    run = runner("call", artifacts / "bundles" / "demo-gemma", "hello", "--backend", "emulate")
    assert run.returncode == 2 and "no chat template in the bundle" in run.stderr and "Traceback" not in run.stderr
