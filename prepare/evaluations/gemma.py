"""How a Gemma bundle is evaluated on held-out sequences (the recipe's `verify`), teacher-forced:
the share of positions whose top-1 token is float's (`top1_agreement`) and the cosine of the
logits (mean, min). The head is the bundle's int8 table (the `cpu` head, and what `--rescore`
gives the TPU heads). With held-out conversations, `verify` also answers each one greedily,
float and int8, and compares the parsed function calls with the expected ones
(`call_exact_match_float`, `call_exact_match_int8`) and with each other (`call_agreement`):
what a Function-Gemma user gets.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from runner.bundle import Bundle
from runner.calls import Assistant
from runner.chat import Chat
from runner.gemma import Gemma, KVCache
from runner.generate import Sampler, generate
from runner.lm_head import FloatHead, make_head
from runner.load import load
from runner.nn import Linear, float_linear

from ..evaluate import cosines
from ..families import gemma
from ..progress import progress_bar
from ..quantize import quantize_weights
from ..recipe import Recipe

GREEDY_PROMPTS = 4  # prompts `verify` decodes greedily, int8 against float
CALL_TOKENS = 64  # at most, per answer of a held-out conversation


class Evaluation:
    """Held-out token sequences, the float model's logits on them (teacher-forced), and the
    int8 embedding table the bundle's host uses for the input embedding and the cpu head."""

    primary = ("logits_cosine_mean", "top1_agreement")
    # The final hidden state's cosine: what the logits follow, without a vocabulary-wide
    # matmul per layer (at 262144 tokens that is most of an evaluation's time).
    sensitivity_keys = ("hidden_cosine_mean",)

    def __init__(self, recipe: Recipe, config, weights: Mapping[str, np.ndarray]):
        self.config = config
        self.sequences = [s for s in gemma.calibration_prompts(recipe, config, "verify", recipe.verify.tokens) if len(s) > 1]
        self.conversations = gemma.conversations(recipe, "verify")
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
