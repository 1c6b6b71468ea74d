"""The Gemma-3 family: what the build needs to know about Gemma.

Its decoder linears and the tied LM head cut into tiles; the tensors the host keeps;
the calibration prompts (a text file; conversations rendered by the checkpoint's chat
template, as long as real prompts with tool declarations are; seeded synthetic token
sequences) run through the float model while each linear's inputs are recorded; which
norms feed which linears (for smoothing); and the evaluation on held-out sequences,
teacher-forced: the share of positions whose top-1 token is float's (`top1_agreement`) and
the cosine of the logits (mean, min). The head is the bundle's int8 table (the `cpu` head,
and what `--rescore` gives the TPU heads). With held-out conversations, `verify` also
answers each one greedily, float and int8, and compares the parsed function calls with
the expected ones (`call_exact_match_float`, `call_exact_match_int8`) and with each other
(`call_agreement`): what a Function-Gemma user gets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
from tokenizers import Tokenizer

from runner.bundle import Bundle
from runner.calls import Assistant
from runner.chat import Chat
from runner.checkpoint import Checkpoint, CheckpointError
from runner.gemma import Gemma, GemmaConfig, KVCache, linear_names, tensor_shapes
from runner.generate import Sampler, generate
from runner.lm_head import FloatHead, make_head
from runner.load import load
from runner.nn import Linear, float_linear

from ..calibrate import InputRecorder
from ..evaluate import cosines
from ..progress import progress_bar
from ..quantize import quantize_weights
from ..recipe import Recipe, RecipeError
from ..smoothing import NormGroup
from .base import HEAD_TILE, LinearSpec, fuse, is_host_layer, pad_outputs, parse_config, read_model_config

TOWERS = ("decoder",)
GENERATORS = ("demo-gemma", "demo-gemma-outliers", "random-gemma-270m", "random-gemma-270m-outliers")
TARGET_METRICS = ("top1_agreement", "logits_cosine_mean", "logits_cosine_min")
GOAL = {"top1_agreement": 0.99}  # bench/fidelity.py's GEMMA_GOAL
LM_HEAD = True  # the tied head is cut into TPU tiles (the recipe's `lm_head`)
SYNTHETIC_TOKENS = 128  # longest seeded synthetic calibration sequence (prompts and conversations keep their length)
# The Edge TPU has about 8 MiB of on-chip parameter memory (edgetpu-format.md); a head tile's
# int8 weights get at most this much of it, the rest is left for its multipliers and code.
TILE_BUDGET_BYTES = 6 << 20
HEAD_INPUTS = "lm_head"  # calibration rows of every tile: the final-normed hidden states
EMBEDDING = "model.embed_tokens"
# Kept on the host as int8 rows with a float32 scale per row (prepare/bundle.py): the input
# embedding and the `--lm-head cpu` head read it, memory-mapped, at a quarter of the float size.
INT8_TABLES = (EMBEDDING,)
GREEDY_PROMPTS = 4  # prompts `verify` decodes greedily, int8 against float
CALL_TOKENS = 64  # at most, per answer of a held-out conversation
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
        tokenizer = Tokenizer.from_file(str(recipe.checkpoint_dir / "tokenizer.json"))
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


class Evaluation:
    """Held-out token sequences, the float model's logits on them (teacher-forced), and the
    int8 embedding table the bundle's host uses for the input embedding and the cpu head."""

    primary = ("logits_cosine_mean", "top1_agreement")
    # The final hidden state's cosine: what the logits follow, without a vocabulary-wide
    # matmul per layer (at 262144 tokens that is most of an evaluation's time).
    sensitivity_keys = ("hidden_cosine_mean",)

    def __init__(self, recipe: Recipe, config, weights: Mapping[str, np.ndarray]):
        self.config = config
        self.sequences = [s for s in calibration_prompts(recipe, config, "verify", recipe.verify.tokens) if len(s) > 1]
        self.conversations = conversations(recipe, "verify")
        table = weights["model.embed_tokens.weight"]
        q, scale = quantize_weights(table)
        self.table = q.astype(np.float32) * scale[:, None]  # the bundle's int8 table, dequantized
        self.reference_hidden = self.hidden(weights, float_linear(weights), embed=table)
        self.reference = self.logits(self.reference_hidden, table)
        self.reference_top1 = [r.argmax(-1) for r in self.reference]

    def hidden(self, weights, linear: Linear, embed: np.ndarray | None = None) -> list[np.ndarray]:
        """The final-normed hidden states of every sequence; the input embedding is the bundle's
        int8 table unless `embed` gives another."""
        table = self.table if embed is None else embed
        model = Gemma(self.config, weights, linear, embed=lambda ids: table[ids])
        return [model.forward(ids, KVCache(self.config)) for ids in self.sequences]

    def softcap(self, logits: np.ndarray) -> np.ndarray:
        return Gemma(self.config, {}, None).softcap(logits)

    def logits(self, hidden: list[np.ndarray], table: np.ndarray | None = None) -> list[np.ndarray]:
        table = self.table if table is None else table
        return [self.softcap(h @ table.T) for h in hidden]

    def outputs(self, weights, linear: Linear, towers=None) -> list[np.ndarray]:
        return self.logits(self.hidden(weights, linear))

    def metrics(self, outputs: list[np.ndarray]) -> dict[str, float]:
        top1 = np.concatenate([o.argmax(-1) == r for o, r in zip(outputs, self.reference_top1)])
        cos = np.concatenate([cosines(o, r) for o, r in zip(outputs, self.reference)])
        return {"top1_agreement": float(top1.mean()), "logits_cosine_mean": float(cos.mean()),
                "logits_cosine_min": float(cos.min())}

    def score(self, weights, linear: Linear, towers=None) -> dict[str, float]:
        return self.metrics(self.outputs(weights, linear))

    def sensitivity_metrics(self, weights, linear: Linear, layer: str) -> dict[str, float]:
        hidden = np.concatenate(self.hidden(weights, linear))
        return {"hidden_cosine_mean": float(cosines(hidden, np.concatenate(self.reference_hidden)).mean())}

    def inputs_summary(self) -> dict:
        return {"sequences": len(self.sequences), "positions": int(sum(len(s) for s in self.sequences)),
                **({"conversations": len(self.conversations)} if self.conversations else {})}

    def bundle_metrics(self, bundle: Bundle, linear: Linear, recipe: Recipe, checkpoint, config) -> dict:
        """The metrics of a bundle's int8 path (`linear` runs its layers; the input embedding is
        its int8 table); then its TPU head's top-1 (plain, with --rescore) on the bundle's hidden
        states, and greedy decoding against float's."""
        hidden = self.hidden(bundle.host, linear)
        out = self.metrics(self.logits(hidden))
        k = recipe.verify.rescore
        if bundle.lm_head is not None:
            for label, rescore in (("top1_agreement_tpu_head", None), ("top1_agreement_rescore", k)):
                head, _ = make_head(bundle, "emulate", "tpu-preload", rescore=rescore)
                agree = [int(np.argmax(self.softcap(head(h[i]))) == ref[i])
                         for h, ref in zip(hidden, self.reference_top1) for i in range(len(h))]
                out[label] = float(np.mean(agree))
            out["rescore"] = k
        steps = recipe.verify.greedy_steps
        if steps:
            float_model = Gemma(config, checkpoint, float_linear(checkpoint))
            float_head = FloatHead(checkpoint, config.vocab_size)
            prompts = [list(s[: max(1, len(s) // 2)]) for s in self.sequences[:GREEDY_PROMPTS]]
            heads = {"cpu": {}, "tpu-preload": {"rescore": k}} if bundle.lm_head is not None else {"cpu": {}}
            for mode, options in heads.items():
                loaded = load(bundle.dir, "emulate", lm_head=mode, **options)
                lengths = []
                for prompt in prompts:
                    ref = [s.token for s in generate(float_model, float_head, prompt, steps, Sampler())]
                    got = [s.token for s in generate(loaded.model, loaded.head, prompt, steps, Sampler())]
                    same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
                    lengths.append(same)
                key = "greedy_match" if mode == "cpu" else "greedy_match_rescore"
                out[key] = {"mean": float(np.mean(lengths)), "min": int(min(lengths)), "steps": steps,
                            "prompts": len(prompts)}
        if self.conversations:
            out.update(self.call_metrics(bundle, recipe, checkpoint, config))
        return out

    def call_metrics(self, bundle: Bundle, recipe: Recipe, checkpoint, config) -> dict:
        """Each held-out conversation answered greedily by the float model and by the bundle
        (emulate, exact cpu head), as `runner call` answers (the parallel stop rule, so a turn
        may hold several calls): the calls parsed against the conversation's tools and compared
        with the expected ones and with each other. `call_answers` lists every request's."""
        chat = Chat.from_dir(recipe.checkpoint_dir)
        loaded = load(bundle.dir, "emulate", lm_head="cpu")
        assistants = {"float": Assistant(Gemma(config, checkpoint, float_linear(checkpoint)),
                                         FloatHead(checkpoint, config.vocab_size), chat),
                      "int8": Assistant(loaded.model, loaded.head, chat)}
        answers = []
        with progress_bar("calls (float, int8)", "conversation", len(self.conversations)) as update:
            for row in self.conversations:
                answers.append(self._answer(row, assistants, str(recipe.input_path("verify", "conversations"))))
                update(1)
        return {"call_exact_match_float": float(np.mean([a["exact_float"] for a in answers])),
                "call_exact_match_int8": float(np.mean([a["exact_int8"] for a in answers])),
                "call_agreement": float(np.mean([a["agree"] for a in answers])),
                "call_answers": answers}

    @staticmethod
    def _answer(row: dict, assistants: dict[str, Assistant], source: str) -> dict:
        tools = row.get("tools") or None
        got = {label: a.reply(row["messages"], tools, steps=CALL_TOKENS, parallel=True, source=source).answer
               for label, a in assistants.items()}
        requests = [m.get("content") for m in row["messages"] if m.get("role") == "user"]
        return {"request": requests[-1] if requests else None, "expected": row["expected"],
                **{label: a.to_json() for label, a in got.items()},
                **{f"exact_{label}": _exact(a, row["expected"]) for label, a in got.items()},
                "agree": got["int8"].calls == got["float"].calls
                and bool(got["int8"].malformed) == bool(got["float"].malformed)}


def _exact(answer, expected: list) -> bool:
    """The calls a right answer makes, in order, names and typed arguments equal; nothing
    malformed (an empty `expected`: a text answer, no call)."""
    return not answer.malformed and answer.calls == expected
