"""The Gemma-3 family: what the build needs to know about Gemma.

Its decoder linears and the tied LM head cut into tiles; the tensors the host keeps;
the calibration prompts (a text file; conversations rendered by the checkpoint's chat
template, as long as real prompts with tool declarations are; seeded synthetic token
sequences) run through the float model while each linear's inputs are recorded; which
norms feed which linears (for smoothing). Its held-out sequences and conversations
(`verify`) are read here too; how they are scored is prepare/evaluations/gemma.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runner.chat import Chat
from runner.checkpoint import Checkpoint, CheckpointError
from runner.gemma import Gemma, GemmaConfig, KVCache, linear_names, tensor_shapes
from runner.lm_head import EMBEDDING
from runner.nn import float_linear
from runner.tokenizer import load_tokenizer

from ..calibrate import InputRecorder
from ..family_facts import FAMILIES
from ..recipe import Recipe, RecipeError
from ..smoothing import NormGroup
from .base import HEAD_TILE, LinearSpec, fuse, is_host_layer, pad_outputs, parse_config, read_model_config

FACTS = FAMILIES["gemma"]
TOWERS, GENERATORS, TARGET_METRICS, LM_HEAD = FACTS.towers, FACTS.generators, FACTS.target_metrics, FACTS.lm_head
GOAL = {"top1_agreement": 0.99}  # bench/fidelity.py's GEMMA_GOAL
SYNTHETIC_TOKENS = 128  # longest seeded synthetic calibration sequence (prompts and conversations keep their length)
# The Edge TPU has about 8 MiB of on-chip parameter memory (edgetpu-format.md); a head tile's
# int8 weights get at most this much of it, the rest is left for its multipliers and code.
TILE_BUDGET_BYTES = 6 << 20
HEAD_INPUTS = "lm_head"  # calibration rows of every tile: the final-normed hidden states
# Kept on the host as int8 rows with a float32 scale per row (prepare/bundle.py): the input
# embedding and the `--lm-head cpu` head read it, memory-mapped, at a quarter of the float size.
INT8_TABLES = (EMBEDDING,)
CONVERSATION_SEQUENCES = 8  # held-out conversations' prompts among the teacher-forced sequences
MAX_CONVERSATIONS_BYTES = 64 << 20


def model_config(recipe: Recipe) -> GemmaConfig:
    return read_model_config(recipe, GemmaConfig.from_dict, "Gemma-3")


def tile_rows(recipe: Recipe, config: GemmaConfig) -> int:
    """Vocabulary rows per LM-head tile: the recipe's, or the largest power of two whose
    int8 weights fit the on-chip budget (and no larger than the vocabulary needs)."""
    if recipe.lm_head.tile_rows:
        return recipe.lm_head.tile_rows
    rows = 1
    while rows * 2 * config.hidden_size <= TILE_BUDGET_BYTES and rows < config.vocab_size:
        rows *= 2
    return rows


def specs(recipe: Recipe, config: GemmaConfig) -> list[LinearSpec]:
    """The decoder linears, then the tied head as tiles of `tile_rows` vocabulary rows
    (the last one zero-padded)."""
    shapes = tensor_shapes(config)
    decoder = [LinearSpec(n, shapes[f"{n}.weight"][1], shapes[f"{n}.weight"][0]) for n in linear_names(config)]
    t, v = tile_rows(recipe, config), config.vocab_size
    head = [LinearSpec(f"{HEAD_TILE}{i}", config.hidden_size, t, tensor=f"{EMBEDDING}.weight",
                       rows=(i * t, min((i + 1) * t, v)), inputs=HEAD_INPUTS) for i in range(-(-v // t))]
    return pad_outputs(fuse(decoder, norm_groups(config), recipe), recipe) + head


def workload_calls(recipe: Recipe, config: GemmaConfig) -> list[tuple[LinearSpec, list[int]]]:
    """Each TPU linear and the rows of its calls in the recipe's workload: the prefill of a
    `prompt_tokens` prompt, every decoder linear once with that many rows and each head
    tile with one (the last position). Decode steps, a row each, go to the CPU (--route
    auto) and do not choose a batch."""
    rows = recipe.workload.prompt_tokens
    return [(s, [1 if s.is_head_tile else rows]) for s in specs(recipe, config) if not is_host_layer(s, recipe)]


def required_shapes(recipe: Recipe, config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    return tensor_shapes(config)


def needs_tokenizer(recipe: Recipe) -> bool:
    return True


def norm_groups(config: GemmaConfig, towers=TOWERS) -> list[NormGroup]:
    """Each layer's input norm (read by q/k/v) and pre-feedforward norm (gate/up). The final
    norm feeds the tied LM head, whose weight is also the input embedding: it is left alone."""
    groups = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        groups.append(NormGroup(f"{p}.input_layernorm", "rms",
                                tuple(f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj"))))
        groups.append(NormGroup(f"{p}.pre_feedforward_layernorm", "rms",
                                (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj")))
    return groups


def open_checkpoint(recipe: Recipe) -> tuple[Checkpoint, GemmaConfig]:
    checkpoint = Checkpoint(recipe.checkpoint_dir)
    config = parse_config(checkpoint.config, GemmaConfig.from_dict, recipe, "Gemma-3")
    checkpoint.require(tensor_shapes(config))
    if not (recipe.checkpoint_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{recipe.checkpoint_dir}: no tokenizer.json")
    return checkpoint, config


def read_conversations(path: Path, expected: bool = False) -> list[dict]:
    """A JSON-lines file of conversations, each {"tools": [...], "messages": [...]} (and with
    `expected`, "expected": the calls a right answer makes, [] for a text answer), checked
    line by line: a bad one is a RecipeError naming the file and the line."""
    try:
        if path.stat().st_size > MAX_CONVERSATIONS_BYTES:
            raise RecipeError(f"{path}: larger than {MAX_CONVERSATIONS_BYTES} bytes")
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read conversations ({e})") from e
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise RecipeError(f"{path}:{number}: not JSON ({e})") from e
        problem = None
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"] \
                or not all(isinstance(m, dict) for m in row["messages"]):
            problem = 'needs "messages", a non-empty list of message objects'
        elif not isinstance(row.get("tools", []), list) or not all(isinstance(t, dict) for t in row.get("tools", [])):
            problem = '"tools" must be a list of tool objects'
        elif expected and not (isinstance(row.get("expected"), list) and all(
                isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments", {}), dict)
                for c in row["expected"])):
            problem = 'needs "expected", a list of calls {"name", "arguments"} ([] for a text answer)'
        if problem:
            raise RecipeError(f"{path}:{number}: {problem}")
        if expected:  # a call written without arguments has none
            row["expected"] = [{"name": c["name"], "arguments": c.get("arguments", {})} for c in row["expected"]]
        rows.append(row)
    if not rows:
        raise RecipeError(f"{path}: no conversations")
    return rows


def conversations(recipe: Recipe, section: str) -> list[dict]:
    path = recipe.input_path(section, "conversations")
    return [] if path is None else read_conversations(path, expected=section == "verify")


def render(recipe: Recipe, config: GemmaConfig, rows: list[dict]) -> list[np.ndarray]:
    """Conversations as prompts (the generation prompt included), by the checkpoint's chat template."""
    if not rows:
        return []
    chat = Chat.from_dir(recipe.checkpoint_dir)
    return [np.array(chat.encode(r["messages"], r.get("tools") or None)[: config.max_position_embeddings - 1],
                     np.int64) for r in rows]


def calibration_prompts(recipe: Recipe, config: GemmaConfig, section: str = "calibration",
                        max_tokens: int | None = None) -> list[np.ndarray]:
    """Token-id sequences: the recipe's prompts (tokenized; cut at `max_tokens`, verify's
    teacher-forced length) and conversations (rendered, as long as they are), then seeded
    synthetic ones (of `calibration`, or of `verify`: the held-out ones)."""
    context = config.max_position_embeddings - 1
    rows = []
    inputs = getattr(recipe, section)
    lines = recipe.input_lines(section, "prompts")
    if lines:
        tokenizer = load_tokenizer(recipe.checkpoint_dir / "tokenizer.json")
        rows += [np.array(tokenizer.encode(line).ids[: min(max_tokens or context, context)], np.int64)
                 for line in lines]
    chats = conversations(recipe, section)
    rows += render(recipe, config, chats if section == "calibration" else chats[:CONVERSATION_SEQUENCES])
    rng = np.random.default_rng(inputs.seed)
    longest = min(max_tokens or SYNTHETIC_TOKENS, context)
    for _ in range(inputs.synthetic):
        n = int(rng.integers(8, longest)) if section == "calibration" else longest - 1
        rows.append(np.concatenate([[config.bos_token_id], rng.integers(4, config.vocab_size, n)]).astype(np.int64))
    return [r for r in rows if len(r)]


def calibration_count(recipe: Recipe) -> int:
    return (len(recipe.input_lines("calibration", "prompts")) + len(conversations(recipe, "calibration"))
            + recipe.calibration.synthetic)


def record_calibration(recipe: Recipe, checkpoint: Checkpoint, config: GemmaConfig,
                       progress=lambda n: None) -> dict[str, np.ndarray]:
    recorder = InputRecorder(float_linear(checkpoint), recipe.calibration.max_rows, recipe.calibration.seed)
    model = Gemma(config, checkpoint, recorder)
    for ids in calibration_prompts(recipe, config):
        recorder.record(HEAD_INPUTS, model.forward(ids, KVCache(config)))
        progress(1)
    return recorder.inputs()
