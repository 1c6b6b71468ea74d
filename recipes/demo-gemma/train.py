"""Build and train the demo Function-Gemma: a small Gemma-3 that answers in Function-Gemma's format.

    # from the repository root; under 30 minutes on 2 cores (train_log.json says)
    python recipes/demo-gemma/train.py                 # assets, training, model.safetensors
    python recipes/demo-gemma/train.py --assets-only   # tokenizer, configs, data files only
    python recipes/demo-gemma/evaluate.py              # held-out exact match (transformers and runner)

Writes into this directory (or --out):

- tokenizer.json, tokenizer_config.json (with the chat template from template.jinja),
  config.json: see build_tokenizer.py and `model_config`;
- calibration.jsonl: 64 conversations (tools + messages) from the training distribution,
  for the build's calibration;
- verify.jsonl: 240 held-out conversations (tools, messages, expected calls; an empty list
  where the answer is text) whose phrasings and slot values never occur in training or
  calibration (conversations.py, `heldout=True`);
- fresh.jsonl: 120 more, from a second set of held-out phrasings (`fresh=True`) further
  from the training ones, which no run was tuned on;
- model.safetensors (float16) and train_log.json (loss curve, wall and CPU time, settings).

Interrupted, the same command continues where the run stopped: every 25 steps the weights,
AdamW's moments and the data streams' positions are saved to .train_state (safetensors and
JSON), and a continued run ends with the same bytes as an uninterrupted one.

Data: conversations.py generates conversations on the fly (seeded), rendered through the
chat template. The loss is on the model's turns only (each call closed by
<start_function_response>, each text answer closed by <end_of_turn>), all of them in a
conversation, so one rendering of the declarations serves several answers; the LM head
runs on those positions only. Batches group conversations of similar length.

Schedule: --copy-first steps of copying token strings (`CopyBatches`: the mechanism that
copies a city or a name out of the request), then --easy-steps of "easy" conversations
(one or two tools, many exchanges: dense in values to copy), then the full mix; every
--copy-every-th step after the first ones is a copy batch again, so the mechanism stays
general rather than tied to the values training shows.

Model: Gemma3ForCausalLM, hidden 256, 4 layers (sliding, full, full, full; window 64: with
sliding layers alternating, the window hid the tool declarations from half the layers and
the model never learned to refuse an undeclared tool; README.md's runs table),
4 query heads of 64 sharing 1 key-value head (grouped-query attention as in Gemma-3 270M),
MLP 256, tied embeddings over a 4096-token vocabulary. So q_proj, o_proj and the MLP
linears are 256x256 and k_proj, v_proj are 256 -> 64. AdamW with warmup and cosine decay,
seeded; torch runs on at most 2 threads; batches of 10 conversations (64 copy strings),
3600 steps. Same command, same files (torch's CPU kernels are deterministic for this model; the step count
is fixed, not a time budget).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]

import build_tokenizer  # noqa: E402
from conversations import Generator, expected_calls  # noqa: E402

VOCAB = 4096
TOKENIZER_CORPUS = 20000  # conversations the BPE is learned from
CONTEXT = 1024
BOS = 2


def model_config() -> dict:
    """config.json of the demo (read by transformers and by runner/gemma.py)."""
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": VOCAB,
        "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "query_pre_attn_scalar": 64,
        "sliding_window": 64,
        "layer_types": ["sliding_attention", "full_attention", "full_attention", "full_attention"],
        "max_position_embeddings": CONTEXT, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": [1, 5], "bos_token_id": 2,
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
        "torch_dtype": "float16",
    }


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def render_whole(chat, conversation: dict) -> str:
    """The whole conversation, answer included: `render_with_answers`' text in one render
    (its last), for the tokenizer's corpus, which needs no spans."""
    answer = dict(role="assistant", **conversation["answer"])
    return chat.render(conversation["messages"] + [answer], conversation["tools"],
                       add_generation_prompt="tool_calls" in answer)


def render_with_answers(chat, conversation: dict) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation, answer included, and the character spans of every model
    turn in it (the earlier ones too): what the loss is computed on. Each span is what
    the template adds for one assistant message: after a call it ends with
    <start_function_response> (the model hands over to the tool), after text with
    <end_of_turn>."""
    tools = conversation["tools"]
    messages = conversation["messages"] + [dict(role="assistant", **conversation["answer"])]
    spans, text = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = chat.render(messages[:i], tools, add_generation_prompt=True)
        text = chat.render(messages[:i + 1], tools, add_generation_prompt="tool_calls" in message)
        if not text.startswith(before) or (spans and not before.startswith(text[:spans[-1][1]])):
            raise AssertionError("the chat template does not render the conversation as a growing prefix")
        spans.append((len(before), len(text)))
    return text, spans
def build_assets(out: Path) -> None:
    from runner.chat import ChatTemplate, special_tokens

    template = (HERE / "template.jinja").read_text()
    config = build_tokenizer.tokenizer_config(template, CONTEXT)
    chat = ChatTemplate(template, special_tokens(config))
    gen = Generator(seed=1)
    texts = [render_whole(chat, gen.conversation()) for _ in range(TOKENIZER_CORPUS)]
    tokenizer = build_tokenizer.build(texts, VOCAB)
    assert tokenizer.get_vocab_size() == VOCAB, tokenizer.get_vocab_size()
    write(out / "tokenizer.json", tokenizer.to_str())
    write(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    write(out / "config.json", json.dumps(model_config(), indent=2) + "\n")
    write_conversations(out / "calibration.jsonl", Generator(seed=2), 64, expected=False)
    write_conversations(out / "verify.jsonl", Generator(seed=3, heldout=True), 240)
    write_conversations(out / "fresh.jsonl", Generator(seed=4, fresh=True), 120)


def write_conversations(path: Path, gen: Generator, n: int, expected: bool = True) -> None:
    """n conversations of `gen` as JSON lines: tools and messages, and the expected calls."""
    rows = []
    for _ in range(n):
        c = gen.conversation()
        row = {"tools": c["tools"], "messages": c["messages"]}
        rows.append({**row, "expected": expected_calls(c["answer"])} if expected else row)
    write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class Batches:
    """Seeded (ids, targets) batches: conversations grouped by length, right-padded."""

    def __init__(self, out: Path, seed: int, batch: int, pool: int = 64, easy: bool = False):
        from runner.chat import Chat
        self.chat, self.batch, self.pool = Chat.from_dir(out), batch, pool
        self.gen, self.rng, self.queue = Generator(seed=seed, easy=easy), random.Random(seed + 1), []

    def _example(self):
        """(token ids, indices of the tokens to predict) of one conversation."""
        text, spans = render_with_answers(self.chat.template, self.gen.conversation())
        encoding = self.chat.tokenizer.encode(text, add_special_tokens=False)
        targets = []
        for i, (a, b) in enumerate(encoding.offsets):
            for lo, hi in spans:
                if lo <= a < hi:
                    assert b <= hi, "a token crosses the end of a model turn"
                    targets.append(i)
        return encoding.ids, targets

    def state(self) -> dict:
        """Everything needed to continue the stream exactly (JSON: no pickle)."""
        return {"gen": _rng_state(self.gen.rng), "rng": _rng_state(self.rng), "queue": self.queue}

    def restore(self, state: dict) -> None:
        self.gen.rng.setstate(_rng_tuple(state["gen"]))
        self.rng.setstate(_rng_tuple(state["rng"]))
        self.queue = [[(list(ids), list(pred)) for ids, pred in group] for group in state["queue"]]

    def __next__(self):
        import torch
        if not self.queue:
            examples = sorted((self._example() for _ in range(self.batch * self.pool)), key=lambda e: len(e[0]))
            groups = [examples[i:i + self.batch] for i in range(0, len(examples), self.batch)]
            self.rng.shuffle(groups)
            self.queue = groups
        group = self.queue.pop()
        width = max(len(ids) for ids, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)  # <pad> = 0
        targets = torch.full((len(group), width), -100, dtype=torch.long)
        for row, (seq, predict) in enumerate(group):
            ids[row, :len(seq)] = torch.tensor(seq)
            where = torch.tensor(predict)
            targets[row, where - 1] = ids[row, where]  # position t predicts token t + 1
        return ids, targets


class CopyBatches:
    """Seeded (ids, targets) batches that teach copying: each row is <bos>, a string of
    tokens, then the same string again, with the loss on the repeat (its first token
    excepted: nothing predicts it). Copying a city or a name out of the request needs this
    mechanism (attend to the token after the earlier occurrence of this one), and the
    conversations alone teach it slowly: after 1500 steps on them the model copied a
    value's first token and lost the rest ("Stevie Wonder" -> "SSon Sononon").

    Three rows in four are slot values (conversations.py's, of every slot) joined by
    spaces, cut to the string's length: the tokens copied in a call. The fourth is
    uniformly random tokens, so that any token is copied, not only the likely ones.
    Measured (2026-11-26, one thread, batches of 64): strings of value tokens were copied
    at 95% after 750 steps, uniformly random ones at 45% after 350; random ones alone had
    barely moved after 400 steps in the earlier runs that mixed them into conversations."""

    SLOTS = ("city", "to", "room", "artist", "text")

    def __init__(self, tokenizer, seed: int, batch: int, lengths: tuple[int, int] = (3, 16), first: int = 13):
        self.tokenizer, self.batch, self.lengths, self.first = tokenizer, batch, lengths, first
        self.rng, self.gen = random.Random(seed), Generator(seed=seed + 1)
        self.queue = []  # (for Batches' interface: state and restore)

    def state(self) -> dict:
        return {"rng": _rng_state(self.rng), "gen": _rng_state(self.gen.rng)}

    def restore(self, state: dict) -> None:
        self.rng.setstate(_rng_tuple(state["rng"]))
        self.gen.rng.setstate(_rng_tuple(state["gen"]))

    def _string(self, n: int) -> list[int]:
        if self.rng.random() < 0.25:
            return [self.rng.randrange(self.first, VOCAB) for _ in range(n)]
        ids = []
        while len(ids) < n:
            value = str(self.gen.value(self.rng.choice(self.SLOTS)))
            ids += self.tokenizer.encode((" " if ids else "") + value, add_special_tokens=False).ids
        return ids[:n]

    def __next__(self):
        import torch
        n = self.rng.randint(*self.lengths)
        rows = [self._string(n) for _ in range(self.batch)]
        ids = torch.tensor([[BOS] + r + r for r in rows], dtype=torch.long)
        targets = torch.full_like(ids, -100)
        targets[:, n + 1:-1] = ids[:, n + 2:]  # position t predicts token t + 1, over the repeat
        return ids, targets


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_tuple(state: list) -> tuple:
    return state[0], tuple(state[1]), state[2]


def loss_on_answers(model, ids, targets):
    """Cross-entropy on the answer positions only, through the tied head."""
    import torch
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    where = targets != -100
    logits = hidden[where] @ model.model.embed_tokens.weight.T
    return torch.nn.functional.cross_entropy(logits, targets[where])


def save_weights(model, path: Path) -> None:
    import torch
    from safetensors.torch import save_file
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}  # tied to model.embed_tokens.weight
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def save_state(directory: Path, step: int, model, optimizer, streams: dict, log: list, spent: dict) -> None:
    """The run so far, to continue it after an interruption: weights and AdamW moments in
    float32 safetensors, the rest (step, data streams, log, time spent) in JSON."""
    import torch
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st:
                name = names[id(p)]
                tensors[f"adam/{name}/exp_avg"] = st["exp_avg"].contiguous()
                tensors[f"adam/{name}/exp_avg_sq"] = st["exp_avg_sq"].contiguous()
                tensors[f"adam/{name}/step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    save_file(tensors, str(directory / ".state.safetensors.tmp"))
    write(directory / "state.json", json.dumps({"step": step, "streams": streams, "log": log, "spent": spent}))
    (directory / ".state.safetensors.tmp").replace(directory / "state.safetensors")


def load_state(directory: Path, model, optimizer):
    """(step, streams, log, spent) of a saved run; the model and optimizer are filled in."""
    import torch
    from safetensors.torch import load_file
    meta = json.loads((directory / "state.json").read_text())
    tensors = load_file(str(directory / "state.safetensors"))
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}, strict=False)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if f"adam/{name}/exp_avg" in tensors:
            optimizer.state[p] = {"step": torch.tensor(float(tensors[f"adam/{name}/step"][0])),
                                  "exp_avg": tensors[f"adam/{name}/exp_avg"].clone(),
                                  "exp_avg_sq": tensors[f"adam/{name}/exp_avg_sq"].clone()}
    return meta["step"], meta["streams"], meta["log"], meta["spent"]


def train(out: Path, steps: int, batch: int, lr: float, seed: int, threads: int, log_every: int,
          snapshot_every: int = 0, easy_steps: int = 0, save_every: int = 25, stop_after: int | None = None,
          copy_first: int = 0, copy_every: int = 0, copy_until: int | None = None, copy_batch: int = 64) -> dict:
    """Train, saving the run's state every `save_every` steps in out/.train_state; started
    again with the same arguments it continues from there, with the same result as an
    uninterrupted run (same data, same updates)."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(**model_config())
    config._attn_implementation = "sdpa"
    model = transformers.Gemma3ForCausalLM(config).float().train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98), eps=1e-8)
    warmup = max(1, steps // 20)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    streams = {"normal": Batches(out, seed=seed + 100, batch=batch),
               "easy": Batches(out, seed=seed + 200, batch=batch, easy=True)}
    state_dir = out / ".train_state"
    streams["copy"] = CopyBatches(streams["normal"].chat.tokenizer, seed + 300, copy_batch)
    copy_until = steps if copy_until is None else copy_until
    settings = {"steps": steps, "copy_first": copy_first, "copy_every": copy_every, "copy_until": copy_until, "copy_batch": copy_batch,
                "easy_steps": easy_steps, "batch": batch, "lr": lr, "seed": seed}
    start, log, spent = 0, [], {"seconds": 0.0, "cpu_seconds": 0.0}
    if (state_dir / "state.json").exists():
        start, saved, log, spent = load_state(state_dir, model, optimizer)
        if spent.get("settings") != settings:
            raise SystemExit(f"{state_dir}: a run with other settings ({spent.get('settings')}); remove it to start over")
        for name, stream in streams.items():
            stream.restore(saved[name])
        print(f"continuing from step {start}", flush=True)
    spent["settings"] = settings
    t0, cpu0, window = time.perf_counter() - spent["seconds"], time.process_time() - spent["cpu_seconds"], []

    def elapsed():
        return {"seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1)}

    for step in range(start, steps):
        phase = ("copy" if step < copy_first or copy_every and step < copy_until and step % copy_every == 0
                 else "easy" if step < copy_first + easy_steps else "normal")
        ids, targets = next(streams[phase])
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule(step)
        loss = loss_on_answers(model, ids, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            entry = {"step": step + 1, "phase": phase, "loss": round(sum(window) / len(window), 4), **elapsed(),
                     "tokens_per_batch": int(ids.numel())}
            log.append(entry)
            window = []
            print(json.dumps(entry), flush=True)
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            (out / "snapshots").mkdir(exist_ok=True)
            save_weights(model, out / "snapshots" / f"step{step + 1}.safetensors")
        if (step + 1) % save_every == 0 and step + 1 < steps:
            save_state(state_dir, step + 1, model, optimizer, {k: v.state() for k, v in streams.items()}, log,
                       {**elapsed(), "settings": settings})
        if stop_after is not None and step + 1 == stop_after:
            raise SystemExit(f"stopped after step {stop_after} (--stop-after)")
    save_weights(model, out / "model.safetensors")
    # cpu_seconds counts every thread: on an otherwise idle machine the wall time is about
    # cpu_seconds / threads (the machine this ran on was shared, so its wall time is longer)
    return {**settings, "threads": threads, **elapsed(), "final_loss": log[-1]["loss"], "log": log}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--steps", type=int, default=3600)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--copy-first", type=int, default=400, help="start with this many steps of copying "
                   "token strings (CopyBatches): the mechanism every copied value needs")
    p.add_argument("--copy-every", type=int, default=4, help="after that, every K-th step (until "
                   "--copy-until) is a copy batch too, so that the mechanism stays general")
    p.add_argument("--copy-until", type=int, help="the last step a copy batch may take (default: all)")
    p.add_argument("--copy-batch", type=int, default=64)
    p.add_argument("--easy-steps", type=int, default=250, help="after the copy steps, this many steps of easy "
                   "conversations (conversations.py): the model learns to copy values sooner")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=25, help="save the run's state every N steps "
                   "(out/.train_state): the same command continues an interrupted run")
    p.add_argument("--stop-after", type=int, help="stop after N steps, as an interruption would (tests resuming)")
    p.add_argument("--snapshot-every", type=int, default=0, help="also save the weights every N steps "
                   "(to --out/snapshots), to evaluate a run as it goes")
    p.add_argument("--assets-only", action="store_true")
    p.add_argument("--skip-assets", action="store_true", help="train on the assets already in --out")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_assets:
        t = time.perf_counter()
        build_assets(args.out)
        print(f"assets written to {args.out} in {time.perf_counter() - t:.0f} s", flush=True)
    if args.assets_only:
        return 0
    result = train(args.out, args.steps, args.batch, args.lr, args.seed, args.threads, args.log_every,
                   args.snapshot_every, args.easy_steps, args.save_every, args.stop_after,
                   args.copy_first, args.copy_every, args.copy_until, args.copy_batch)
    write(args.out / "train_log.json", json.dumps(result, indent=1) + "\n")
    import shutil
    shutil.rmtree(args.out / ".train_state", ignore_errors=True)
    print(f"trained {args.steps} steps in {result['seconds']} s ({result['cpu_seconds']} CPU seconds), "
          f"final loss {result['final_loss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
