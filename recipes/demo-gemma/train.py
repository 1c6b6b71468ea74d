"""Build and train the demo Function-Gemma: a small Gemma-3 that answers in Function-Gemma's format.

    # from the repository root; about 30 minutes on 2 cores
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
- model.safetensors (float16) and train_log.json (loss curve, wall time, settings).

Data: conversations.py generates conversations on the fly (seeded), rendered through the
chat template. The loss is on the model's turns only (each call closed by
<start_function_response>, each text answer closed by <end_of_turn>), all of them in a
conversation, so one rendering of the declarations serves several answers; the LM head
runs on those positions only. Batches group conversations of similar length.

Model: Gemma3ForCausalLM, hidden 256, 4 layers (sliding, full, sliding, full; window 64),
4 query heads of 64 sharing 1 key-value head (grouped-query attention as in Gemma-3 270M),
MLP 256, tied embeddings over a 4096-token vocabulary. So q_proj, o_proj and the MLP
linears are 256x256 and k_proj, v_proj are 256 -> 64. AdamW with warmup and cosine decay,
seeded; torch runs on at most 2 threads. Same command, same files (torch's CPU kernels are
deterministic for this model; the step count is fixed, not a time budget).
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


def model_config() -> dict:
    """config.json of the demo (read by transformers and by runner/gemma.py)."""
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": VOCAB,
        "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "query_pre_attn_scalar": 64,
        "sliding_window": 64,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
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


def render_turn(chat, conversation: dict) -> tuple[str, str]:
    """(prompt, prompt + the model's turn) as the chat template writes them."""
    text, spans = render_with_answers(chat, conversation)
    return text[:spans[-1][0]], text


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
    texts = [render_turn(chat, gen.conversation())[1] for _ in range(TOKENIZER_CORPUS)]
    tokenizer = build_tokenizer.build(texts, VOCAB)
    assert tokenizer.get_vocab_size() == VOCAB, tokenizer.get_vocab_size()
    write(out / "tokenizer.json", tokenizer.to_str())
    write(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    write(out / "config.json", json.dumps(model_config(), indent=2) + "\n")
    gen = Generator(seed=2)
    rows = []
    for _ in range(64):
        c = gen.conversation()
        rows.append({"tools": c["tools"], "messages": c["messages"]})
    write(out / "calibration.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    gen = Generator(seed=3, heldout=True)
    rows = []
    for _ in range(240):
        c = gen.conversation()
        rows.append({"tools": c["tools"], "messages": c["messages"], "expected": expected_calls(c["answer"])})
    write(out / "verify.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class Batches:
    """Seeded (ids, targets) batches: conversations grouped by length, right-padded."""

    def __init__(self, out: Path, seed: int, batch: int, pool: int = 64):
        from runner.chat import Chat
        self.chat, self.batch, self.pool = Chat.from_dir(out), batch, pool
        self.gen, self.rng, self.queue = Generator(seed=seed), random.Random(seed + 1), []

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


def train(out: Path, steps: int, batch: int, lr: float, seed: int, threads: int, log_every: int,
          snapshot_every: int = 0) -> dict:
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

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = Batches(out, seed=seed + 100, batch=batch)
    log, t0, cpu0, window = [], time.perf_counter(), time.process_time(), []
    for step in range(steps):
        ids, targets = next(batches)
        loss = loss_on_answers(model, ids, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            entry = {"step": step + 1, "loss": round(sum(window) / len(window), 4),
                     "seconds": round(time.perf_counter() - t0, 1),
                     "cpu_seconds": round(time.process_time() - cpu0, 1), "tokens_per_batch": int(ids.numel())}
            log.append(entry)
            window = []
            print(json.dumps(entry), flush=True)
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            (out / "snapshots").mkdir(exist_ok=True)
            save_weights(model, out / "snapshots" / f"step{step + 1}.safetensors")
    save_weights(model, out / "model.safetensors")
    # cpu_seconds counts every thread: on an otherwise idle machine the wall time is about
    # cpu_seconds / threads (the machine this ran on was shared, so its wall time is longer)
    return {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "threads": threads,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(time.process_time() - cpu0, 1), "final_loss": log[-1]["loss"], "log": log}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
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
                   args.snapshot_every)
    write(args.out / "train_log.json", json.dumps(result, indent=1) + "\n")
    print(f"trained {args.steps} steps in {result['wall_seconds']} s, final loss {result['final_loss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
