"""Held-out exact match of the demo Function-Gemma, twice: transformers and the runner.

    python recipes/demo-gemma/evaluate.py [--dir recipes/demo-gemma] [--rows fresh.jsonl] [--limit N] [--out FILE.json]
    python recipes/demo-gemma/evaluate.py --bundle artifacts/bundles/demo-gemma --backend cpu   # int8 too

For every row of verify.jsonl (tools, messages, expected calls; phrasings and slot values
never seen in training) the prompt is the chat template's, and the answer greedy:

- transformers: `AutoTokenizer.apply_chat_template(..., add_generation_prompt=True)` and
  `Gemma3ForCausalLM.generate` in float32 from the committed float16 weights;
- the runner: runner/chat.py's prompt (checked equal to transformers' token for token),
  runner/gemma.py's numpy decoder with the fp32 executor (runner/nn.py's float_linear over
  the checkpoint's weights) and the float head, answering as runner/calls.py answers for
  every caller.

With --bundle, the int8 bundle answers too, on each --backend asked for (emulate, cpu,
edgetpu), with the exact `cpu` LM head, as `runner call` runs it.

Every answer is parsed by runner/function_calls.py against the row's tools. A row is an
exact match when the calls (names and every argument, typed, in order) equal the
expected ones and nothing is malformed; a row expecting no call must get a text answer.
Decoding stops at <start_function_response>, <end_of_turn> or end-of-sequence (the
`parallel` stop rule, so a turn may hold two calls); the default rule, which also stops
at the first <end_function_call>, is scored on the same tokens cut at its first stop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from runner.calls import Assistant  # noqa: E402
from runner.chat import Chat  # noqa: E402
from runner.checkpoint import Checkpoint  # noqa: E402
from runner.function_calls import parse_answer, stop_ids  # noqa: E402
from runner.gemma import Gemma, GemmaConfig, tensor_shapes  # noqa: E402
from runner.lm_head import FloatHead  # noqa: E402
from runner.load import load  # noqa: E402
from runner.nn import float_linear  # noqa: E402

MAX_NEW = 64


def category(expected: list) -> str:
    return "text" if not expected else "two calls" if len(expected) > 1 else expected[0]["name"]


def score(text: str, row: dict) -> tuple[bool, dict]:
    answer = parse_answer(text, row["tools"])
    ok = not answer.malformed and answer.calls == row["expected"]
    return ok, answer.to_json()


def cut(tokens: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i + 1]
    return tokens


def run_transformers(directory: Path, rows: list[dict], chat: Chat, stop: set[int]) -> list[list[int]]:
    import torch
    import transformers

    torch.set_num_threads(2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    outputs = []
    for i, row in enumerate(rows):
        ids = tokenizer.apply_chat_template(row["messages"], tools=row["tools"], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        mine = chat.encode(row["messages"], row["tools"])
        if list(ids) != mine:
            raise AssertionError(f"row {i}: runner/chat.py's prompt differs from transformers'")
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=sorted(stop), pad_token_id=0)
        outputs.append(out[0, len(ids):].tolist())
    return outputs


def run_runner(directory: Path, rows: list[dict], chat: Chat, stop: set[int]) -> list[list[int]]:
    """The float checkpoint through the runner's numpy decoder (the fp32 executor and head),
    answered as every runner caller answers (runner/calls.py)."""
    config = GemmaConfig.from_dict(json.loads((directory / "config.json").read_text()))
    checkpoint = Checkpoint(directory)
    checkpoint.require(tensor_shapes(config))
    weights = {name: checkpoint[name] for name in checkpoint.keys()}  # float32, read once
    assistant = Assistant(Gemma(config, weights, float_linear(weights)), FloatHead(checkpoint, config.vocab_size), chat)
    return answer_all(assistant, rows)


def run_bundle(bundle: Path, backend: str):
    """The int8 bundle on `backend`, as `runner call` runs it (exact cpu head)."""
    def run(directory: Path, rows: list[dict], chat: Chat, stop: set[int]) -> list[list[int]]:
        return answer_all(Assistant.of(load(bundle, backend, lm_head="cpu")), rows)
    return run


def answer_all(assistant: Assistant, rows: list[dict]) -> list[list[int]]:
    """Each row's answer tokens, with the parallel stop rule (module docstring)."""
    return [assistant.reply(row["messages"], row["tools"], steps=MAX_NEW, parallel=True).tokens for row in rows]


def evaluate(directory: Path, limit: int | None = None, only: str | None = None, bundle: Path | None = None,
             backends: tuple[str, ...] = (), rows_file: str = "verify.jsonl") -> dict:
    rows = [json.loads(line) for line in (directory / rows_file).read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    chat = Chat.from_dir(directory)
    eos = json.loads((directory / "config.json").read_text())["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    parallel = stop_ids(chat.tokenizer, eos, parallel=True)
    single = stop_ids(chat.tokenizer, eos)
    result = {"rows_file": rows_file, "rows": len(rows), "max_new_tokens": MAX_NEW}
    outputs = {}
    runs = [(name, run) for name, run in (("transformers", run_transformers), ("runner", run_runner))
            if not only or name == only]
    runs += [(f"bundle {backend}", run_bundle(bundle, backend)) for backend in backends]
    for name, run in runs:
        t = time.perf_counter()
        outputs[name] = run(directory, rows, chat, parallel)
        seconds = time.perf_counter() - t
        matches, by_category, failures, default_matches = 0, Counter(), [], 0
        totals = Counter(category(r["expected"]) for r in rows)
        for row, tokens in zip(rows, outputs[name]):
            text = chat.tokenizer.decode(tokens, skip_special_tokens=True)
            ok, parsed = score(text, row)
            matches += ok
            by_category[category(row["expected"])] += ok
            default_matches += score(chat.tokenizer.decode(cut(tokens, single), skip_special_tokens=True), row)[0]
            if not ok and len(failures) < 25:
                failures.append({"request": row["messages"][-1]["content"],
                                 "tools": [t["function"]["name"] for t in row["tools"]],
                                 "expected": row["expected"], "got": parsed})
        result[name] = {"exact_match": round(matches / len(rows), 4),
                        "exact_match_default_stop": round(default_matches / len(rows), 4),
                        "by_category": {k: f"{by_category[k]}/{n}" for k, n in sorted(totals.items())},
                        "seconds": round(seconds, 1), "failures": failures}
        print(f"{name}: exact match {matches}/{len(rows)} = {matches / len(rows):.4f} "
              f"(default stop rule {default_matches}/{len(rows)}) in {seconds:.0f} s", flush=True)
    if "transformers" in outputs and "runner" in outputs:
        same = sum(a == b for a, b in zip(outputs["transformers"], outputs["runner"]))
        result["identical_token_outputs"] = f"{same}/{len(rows)}"
        print(f"transformers and runner produced the same tokens on {same}/{len(rows)} rows")
    reference = outputs.get("transformers") or outputs.get("runner")
    for name in (n for n in outputs if n.startswith("bundle ") and reference):
        agree = sum(score(chat.tokenizer.decode(a, skip_special_tokens=True), r)[1]
                    == score(chat.tokenizer.decode(b, skip_special_tokens=True), r)[1]
                    for a, b, r in zip(outputs[name], reference, rows))
        result[name]["call_agreement"] = round(agree / len(rows), 4)
        print(f"{name}: the same parsed answer as float on {agree}/{len(rows)} rows")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=HERE)
    p.add_argument("--rows", default="verify.jsonl", help="the held-out file in --dir: verify.jsonl, or "
                   "fresh.jsonl (phrasings kept apart from every change made on verify.jsonl's failures)")
    p.add_argument("--limit", type=int)
    p.add_argument("--only", choices=["transformers", "runner"], help="run one of the two")
    p.add_argument("--bundle", type=Path, help="an int8 bundle of these weights to answer too")
    p.add_argument("--backend", action="append", choices=["emulate", "cpu", "edgetpu"], default=[],
                   help="the bundle's backend (repeat for several; default emulate)")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)
    backends = tuple(args.backend or ["emulate"]) if args.bundle else ()
    result = evaluate(args.dir, args.limit, args.only, args.bundle, backends, args.rows)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
