"""The runner's command line: `python -m runner COMMAND BUNDLE ...`.

    clip-image BUNDLE IMAGE...  [--image-f32le] [--out FILE.npy]   image embeddings
    clip-text  BUNDLE TEXT...   [--out FILE.npy]                   text embeddings
    zero-shot  BUNDLE IMAGE... --labels "a cat,a dog"              label probabilities per image
    call       BUNDLE [REQUEST] [--tools tools.json] [--messages conversation.json]  a function call, parsed
    gemma      BUNDLE (--prompt TEXT | --token-ids 2,818,5279) --steps N --lm-head cpu|tpu-preload|tpu-lazy
               [--lm-cache-capacity N] [--shortlist N] [--rescore K]
               [--temperature T --top-k K --seed S] [--ignore-eos]   text, streamed
    check      BUNDLE [--quick] [--json]                           is the bundle whole; what runs here
    selftest   BUNDLE [--json]                                     the Edge TPU against emulate
    index      BUNDLE PHOTO_DIR --out INDEX_DIR [--batch N] [--dtype float16|float32]   embed a photo library
    search     INDEX_DIR (TEXT | --image FILE) [--top N]           the photos that match best
    serve      BUNDLE... [--host H] [--port P] [--index NAME=DIR]  the OpenAI HTTP API, batching requests

The model commands take `--backend auto|emulate|cpu|edgetpu|fp32` (auto, the default: the
best this machine runs the bundle on, said on stderr; fp32 needs `--checkpoint DIR`: bundles
carry no float weights for layers that run on the TPU), `--route auto|tpu|cpu` (where a
TPU layer's calls go: auto, the default on edgetpu with a bundle built with both the
edgetpu and cpu flavors, sends each call by its rows to the side the build's cost model
says is cheaper), `--json`, `--threads N`, and (but `call`) `--rounds R` (run R times
after one start-up; timings are the median after the first, which also opens each layer).
`--help` shows every option's default, and an example.

`--json` is one object from every command, with `command` and `bundle`, and `input` for
each input. Errors are one line naming the file and the problem, exit status 2; so are
arguments of the wrong form (argparse's usage, then the argument and what is wrong with
it); with `--json`, an error is an object with `error` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from .packages import missing, require

try:
    import numpy as np
except ModuleNotFoundError:  # every module needs it: one line saying how to install it, not a traceback
    print(f"error: {missing('numpy', 'every command needs it')}", file=sys.stderr)
    sys.exit(2)

from . import photos
from .bundle import BundleError
from .calls import Assistant
from .chat import ChatError
from .check import check_bundle, selftest
from .errors import UserError
from .executors import BACKENDS, ROUTES
from .contrastive import Contrastive, LabelError, check_labels, check_template
from .families import GEMMA_FAMILY
from .generate import Sampler, generate
from .generate import stop_ids as gemma_stop_ids
from .interpreter import available_cores, use_threads
from .files import atomic_write, read_json
from .lm_head import DEFAULT_CAPACITY, HEAD_MODES
from .load import Loaded, load
from .tokenizer import TextStream

ERRORS = (UserError, OSError)


def peak_rss_mib() -> float | None:
    """This process's peak resident memory (Linux's VmHWM: since exec, unlike ru_maxrss, which
    keeps the high-water mark of the process it was forked from)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


# -- CLIP and SigLIP: clip-image, clip-text, zero-shot -------------------------------------
# Each command reads its inputs and returns the forward pass to time, and what to report of
# its output; `run_clip` does the rest, the same for the three.

Forward = Callable[[], np.ndarray]
Report = Callable[[np.ndarray], dict]


def norms(inputs: list[str], embeddings: np.ndarray) -> dict:
    return {"results": [{"input": s, "norm": float(np.linalg.norm(e))} for s, e in zip(inputs, embeddings)]}


def image_embeddings(args: argparse.Namespace, towers: Contrastive) -> tuple[Forward, Report]:
    pixels = towers.read_images(args.images, args.image_f32le)
    return lambda: towers.image_embeddings(pixels), lambda out: norms(args.images, out)


def text_embeddings(args: argparse.Namespace, towers: Contrastive) -> tuple[Forward, Report]:
    ids = towers.tokenize(args.texts)  # before the clock starts: forward_ms is the model alone
    return lambda: towers.token_embeddings(ids), lambda out: norms(args.texts, out)


def zero_shot(args: argparse.Namespace, towers: Contrastive) -> tuple[Forward, Report]:
    labels = args.labels
    pixels = towers.read_images(args.images, args.image_f32le)
    towers.tokenize([args.prompt.format(label) for label in labels])

    def forward() -> np.ndarray:  # the command keeps no label embeddings: each round runs both towers
        return towers.zero_shot(pixels, labels, args.prompt)

    def report(probs: np.ndarray) -> dict:
        return {"labels": labels, "results": [{"input": f, "probs": dict(zip(labels, map(float, p))),
                                               "best": labels[int(np.argmax(p))]} for f, p in zip(args.images, probs)]}
    return forward, report


def say_backend(args: argparse.Namespace, loaded: Loaded) -> None:
    """With --backend auto, one line on stderr: the backend chosen, and why not a better one;
    and a line for a part that runs a slower way than the bundle allows (the LM head)."""
    if args.backend == "auto":
        print(loaded.auto_line(), file=sys.stderr)
    if getattr(loaded.head, "note", None):
        print(f"note: {loaded.head.note}", file=sys.stderr)


def run_clip(args: argparse.Namespace) -> dict:
    """Load, read the inputs (`args.inputs`: one of the three above), then run the forward
    pass `--rounds` times; timings, and what the command reports of the output."""
    t0 = time.perf_counter()
    loaded = load(args.bundle, args.backend, args.checkpoint, route=args.route)
    towers = Contrastive(loaded, label_cache=0)
    setup_ms = (time.perf_counter() - t0) * 1e3
    say_backend(args, loaded)
    # Inputs are read and tokenized before the clock starts: forward_ms is the model alone.
    forward, report = args.inputs(args, towers)
    # The first forward also opens each layer (decodes it, or opens its interpreter); with
    # --rounds R, forward_ms is the median of the R - 1 after it.
    forward_ms = []
    for _ in range(args.rounds):
        t1 = time.perf_counter()
        out = forward()
        forward_ms.append((time.perf_counter() - t1) * 1e3)
    timed = forward_ms[1:] or forward_ms
    steady = sorted(timed)[(len(timed) - 1) // 2]
    result = {"command": args.command, "bundle": args.bundle, "backend": loaded.backend, "threads": args.threads,
              "setup_ms": round(setup_ms, 2), "first_forward_ms": round(forward_ms[0], 2),
              "forward_ms": round(steady, 2), "shape": list(out.shape), **report(out),
              "routes": routes_json(loaded), "peak_rss_mib": peak_rss_mib()}
    if args.out:
        save_npy(args.out, out.astype(np.float32))
        result["out"] = args.out
    return result


def routes_json(loaded: Loaded) -> dict | None:
    """Where the linear calls of the whole command went (every round): per side, calls and rows."""
    return loaded.routes.to_json() if loaded.routes else None


def print_routes(result: dict) -> None:
    """With `--route auto`, one line on stderr: how many calls (and rows) went to each side."""
    routes = result.get("routes")
    sides = {k: v for k, v in (routes or {}).items() if k != "route"}
    if routes and routes["route"] == "auto":
        print(f"route {routes['route']}: " + ", ".join(f"{side} {v['calls']} calls ({v['rows']} rows)"
                                                        for side, v in sides.items()), file=sys.stderr)


def save_npy(path: str, array: np.ndarray) -> None:
    """np.save atomically (runner/files.py): never half a file. A failure names `path`, not
    the temporary file."""
    try:
        atomic_write(Path(path), lambda f: np.save(f, array, allow_pickle=False))
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from e


def print_clip(result: dict) -> None:
    print(f"{result['command']} on {result['backend']}: setup {result['setup_ms']:.1f} ms, "
          f"forward {result['forward_ms']:.1f} ms, output {result['shape']}")
    for r in result["results"]:
        if "probs" in r:
            probs = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["probs"].items(), key=lambda kv: -kv[1]))
            print(f"  {r['input']}: {probs}")
        else:
            print(f"  {r['input']}: norm {r['norm']:.4f}")
    if "out" in result:
        print(f"embeddings written to {result['out']}")
    print_routes(result)


def clip_command(args: argparse.Namespace) -> int:
    result = run_clip(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_clip(result)
    return 0


# -- Gemma ---------------------------------------------------------------------------------

def run_gemma(args: argparse.Namespace, out=sys.stdout) -> dict:
    """Load, then generate `--rounds` times; the first round streams its text to `out`
    unless --json. Timings of every round, and a summary (see below)."""
    t0 = time.perf_counter()
    loaded = load(args.bundle, args.backend, args.checkpoint, lm_head=args.lm_head,
                  capacity=args.lm_cache_capacity, shortlist=args.shortlist, rescore=args.rescore,
                  route=args.route)
    loaded.require(GEMMA_FAMILY, "`gemma`")
    setup_ms = (time.perf_counter() - t0) * 1e3
    say_backend(args, loaded)
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.prompt is not None:
        if tokenizer is None:
            raise BundleError(f"{loaded.bundle.dir}: no tokenizer in the bundle; give --token-ids")
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = args.token_ids
    sampler = Sampler(args.temperature, args.top_k, args.seed)
    stop = set() if args.ignore_eos else gemma_stop_ids(model.config)
    rounds = []
    for r in range(args.rounds):
        steps = []
        text = TextStream(tokenizer.decode) if r == 0 and not args.json and tokenizer is not None else None
        for step in generate(model, loaded.head, prompt, args.steps, sampler, stop):
            steps.append(step)
            if text:
                out.write(text.push(step.token))
                out.flush()
        tokens = [s.token for s in steps]
        decode_ms = [s.ms for s in steps[1:]]
        head = {k: sum(s.head[k] for s in steps) for k in steps[0].head}
        rounds.append({"tokens": tokens, "prefill_ms": round(steps[0].ms, 2),
                       "ms_per_token": round(float(np.mean(decode_ms)), 2) if decode_ms else None,
                       "head": head, "steps": [{"token": s.token, "ms": round(s.ms, 2), **s.head} for s in steps]})
        if r == 0 and not args.json:
            out.write("\n")
    # With several rounds the first is a warm-up (it opens each layer: decodes it, or opens its interpreter):
    # the summary is the median of the others.
    timed = rounds[1:] or rounds
    middle = sorted(timed, key=lambda r: r["ms_per_token"] or r["prefill_ms"])[(len(timed) - 1) // 2]
    first = rounds[0]
    stopped = ("eos" if first["tokens"][-1] in stop else "steps" if len(first["tokens"]) == args.steps
               else "context")
    return {"command": args.command, "bundle": args.bundle, "backend": loaded.backend, "threads": args.threads,
            "lm_head": loaded.head.mode,
            "prompt_tokens": prompt, "tokens": first["tokens"],
            "text": tokenizer.decode(first["tokens"]) if tokenizer else None, "stopped": stopped,
            "setup_ms": round(setup_ms, 2), "prefill_ms": middle["prefill_ms"],
            "ms_per_token": middle["ms_per_token"], "head": first["head"], "routes": routes_json(loaded),
            "peak_rss_mib": peak_rss_mib(),
            "rounds": rounds}


def print_gemma(result: dict) -> None:
    per_token = f"{result['ms_per_token']:.1f}" if result["ms_per_token"] is not None else "-"
    print(f"gemma on {result['backend']}, lm-head {result['lm_head']}: setup_ms {result['setup_ms']:.1f}, "
          f"prefill_ms {result['prefill_ms']:.1f} ({len(result['prompt_tokens'])} prompt tokens), "
          f"ms_per_token {per_token} ({len(result['tokens'])} tokens, stopped at {result['stopped']})")
    h = result["head"]
    if result["lm_head"] == "cpu":
        if h["rescored"]:
            print(f"  head: {h['rescored']} tokens given both int8 parts of the hidden state (no other could be chosen)")
    elif h["tiles"] or h["rescored"]:
        print(f"  head: {h['tiles']} tiles run, {h['hits']} hits, {h['misses']} misses, {h['evictions']} evictions, "
              f"{h['rescored']} tokens rescored")
    if len(result["rounds"]) > 1:
        for i, r in enumerate(result["rounds"]):
            print(f"  round {i + 1}: prefill_ms {r['prefill_ms']:.1f}, ms_per_token {r['ms_per_token']}, "
                  f"misses {r['head']['misses']}")
    if result["text"] is None:
        print("  tokens: " + ",".join(map(str, result["tokens"])))
    print_routes(result)


def gemma_command(args: argparse.Namespace) -> int:
    result = run_gemma(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_gemma(result)
    return 0


# -- call: tools in, a function call out ---------------------------------------------------

MAX_CALL_INPUT_BYTES = 8 << 20  # a tools or messages file


def call_command(args: argparse.Namespace) -> int:
    """The conversation (and tools) answered as runner/calls.py answers it: rendered with the
    bundle's chat template, decoded greedily to a Function-Gemma stop token, the turn parsed."""
    tools = read_json(args.tools, ChatError, MAX_CALL_INPUT_BYTES) if args.tools else None
    messages = read_json(args.messages, ChatError, MAX_CALL_INPUT_BYTES) if args.messages else []
    if not isinstance(messages, list):
        raise ChatError(f"{args.messages}: a conversation is a JSON list of message objects")
    if args.request:
        messages = [*messages, {"role": "user", "content": args.request}]
    if not messages:
        raise ChatError("nothing to answer: give a request, or --messages FILE")
    t0 = time.perf_counter()
    loaded = load(args.bundle, args.backend, args.checkpoint, lm_head=args.lm_head, route=args.route)
    assistant = Assistant.of(loaded)
    source = args.messages or "the request"
    setup_ms = (time.perf_counter() - t0) * 1e3
    say_backend(args, loaded)
    tools_source = args.tools
    if tools is None and loaded.bundle.tools is not None:  # the recipe's tools, carried in the bundle
        tools_source = str(loaded.bundle.tools.path)
        tools = read_json(tools_source, ChatError, MAX_CALL_INPUT_BYTES)
        print(f"tools: {tools_source} (the bundle's; --tools FILE gives others)", file=sys.stderr)
    if not tools:
        print("note: no tools given (--tools FILE): Function-Gemma can only answer in text", file=sys.stderr)
    reply = assistant.reply(messages, tools, steps=args.steps, parallel=args.parallel, source=source,
                            tools_source=tools_source)
    ms_per_token = reply.ms_per_token
    result = {"command": args.command, "bundle": args.bundle, "backend": loaded.backend, "threads": args.threads,
              **reply.answer.to_json(), "prompt_tokens": reply.prompt, "tokens": reply.tokens,
              "stopped": reply.stopped, "setup_ms": round(setup_ms, 2), "prefill_ms": round(reply.prefill_ms, 2),
              "ms_per_token": round(ms_per_token, 2) if ms_per_token is not None else None,
              "routes": routes_json(loaded)}
    prompt, tokens = reply.prompt, reply.tokens
    if args.json:
        print(json.dumps(result))
        return 0
    for call in result["calls"]:
        print(json.dumps(call))
    for bad in result.get("malformed", []):
        print(f"malformed call: {json.dumps(bad)}")
    if not result["calls"] and result.get("text"):
        print(result["text"])
    print(f"call on {result['backend']}: setup_ms {result['setup_ms']:.1f}, prefill_ms {result['prefill_ms']:.1f} "
          f"({len(prompt)} prompt tokens), ms_per_token {result['ms_per_token'] or 0:.1f} "
          f"({len(tokens)} tokens, stopped at {result['stopped']})", file=sys.stderr)
    print_routes(result)
    return 0


# -- check, selftest -----------------------------------------------------------------------

def check_command(args: argparse.Namespace) -> int:
    report = {"command": args.command, "bundle": args.bundle, **check_bundle(args.bundle, args.quick)}
    if args.json:
        print(json.dumps(report))
    else:
        verdict = "ok" if report["ok"] else "NOT OK" if report["problems"] else "whole, but it cannot be opened here"
        print(f"{args.bundle}: {verdict} ({report['files']} files, {report['checked']} checked)")
        for problem in report["problems"]:
            print(f"  problem: {problem}")
        for line in report["machine"]["missing"]:
            print(f"  missing: {line}")
        print("  backends here: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in report["backends"].items()
                                              if k != "fp32") + " (fp32 runs a float checkpoint: --checkpoint DIR)")
        m = report["machine"]
        print(f"  interpreter {m['interpreter'] or 'none'}, libedgetpu {m['libedgetpu'] or 'none'}, "
              f"devices {', '.join(m['edgetpu_devices']) or 'none'}")
        for note in report["notes"]:
            print(f"  note: {note}")
        plan = report["routes"]
        if plan:
            print(f"  --route auto ({plan['cost_model']}): " + ", ".join(
                f"{n} layers {'on the CPU always' if rows == 'never' else f'to the TPU from {rows} rows'}"
                for rows, n in plan["tpu_from_rows"].items()))
    return 0 if report["ok"] else 1


def selftest_command(args: argparse.Namespace) -> int:
    report = {"command": args.command, "bundle": args.bundle, **selftest(args.bundle)}
    if args.json:
        print(json.dumps(report))
    elif report["error"]:
        print(report["error"])
    else:
        for t in report["templates"]:
            print(f"{t['template']}: {' / '.join(t['layers'])}: max difference {t['max_difference']} step(s): "
                  f"{'agrees' if t['agrees'] else 'MISMATCH'}")
    return report["status"]


# -- photo search: index, search (runner/photos.py) ---------------------------------------

def index_command(args: argparse.Namespace) -> int:
    try:
        result = photos.build_index(args.bundle, args.photos, args.out, args.backend, args.checkpoint, args.batch,
                                    args.dtype)
    except KeyboardInterrupt:
        print(f"interrupted: what was embedded is saved in {args.out}; run again to go on", file=sys.stderr)
        return 130
    print(json.dumps(result) if args.json else photos.format_index(result))
    return 0


def search_command(args: argparse.Namespace) -> int:
    result = photos.search(args.index, args.text, args.image, args.top, args.backend, args.checkpoint, args.bundle)
    print(json.dumps(result) if args.json else photos.format_search(result))
    return 0


# -- the command line ----------------------------------------------------------------------
# argparse checks every argument's form (exit 2, naming the argument); what only the bundle
# can tell (a --shortlist beyond the head's tiles, a token id beyond the vocabulary) is
# checked where the bundle is known.

def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `low`."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return integer


class OutputError(UserError):
    """An output file that cannot be written; the message names it."""


def output_file(text: str) -> str:
    """An argparse type: a file to write, in a directory that exists (checked before the
    model runs, so a typo costs no forward pass)."""
    parent = Path(text).parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the directory {parent} does not exist")
    return text


def non_negative_number(text: str) -> float:
    """An argparse type: a number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text!r}")
    return value


def label_list(text: str) -> list[str]:
    """--labels "a cat,a dog" -> ["a cat", "a dog"]."""
    found = [s.strip() for s in text.split(",") if s.strip()]
    if not found:
        raise argparse.ArgumentTypeError(f"needs at least one label, got {text!r}")
    try:
        return check_labels(found)
    except LabelError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def label_template(text: str) -> str:
    """--prompt "a photo of {}": the label goes where {} is."""
    try:
        return check_template(text)
    except LabelError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def token_id_list(text: str) -> list[int]:
    """--token-ids 2,818,5279 -> [2, 818, 5279]."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers like 2,818,5279") from None
    if not ids:
        raise argparse.ArgumentTypeError("is empty")
    return ids


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each option's default where it has one (not for flags and unset options),
    and the examples' lines kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not action.option_strings or unset or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse's parser; with --json on the command line, its errors are a JSON object too."""

    json_errors = False

    def error(self, message: str):
        if Parser.json_errors:
            print(json.dumps({"command": self.prog.split()[-1], "error": message}))
            sys.exit(2)
        super().error(message)


def examples(*lines: str) -> str:
    return ("examples:" if len(lines) > 1 else "example:") + "".join(f"\n  python -m runner {line}" for line in lines)


THREADS_OPTION = dict(type=at_least(1), default=available_cores(), metavar="N",
                      help="threads of each TFLite interpreter (cpu and edgetpu backends); numpy's BLAS "
                           "takes OMP_NUM_THREADS / OPENBLAS_NUM_THREADS from the environment")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m runner", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
               epilog="Each command's --help has an example. Errors are one line naming the file and the problem "
                      "(exit status 2); with --json, a JSON object with `error`.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, *example_lines: str, parents=()) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=list(parents), help=help, description=help,
                              epilog=examples(*example_lines), formatter_class=HelpFormatter)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("bundle", help="the bundle directory (artifacts/bundles/NAME; bundles/NAME on a Pi)")
    common.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="where the linear layers run; auto: edgetpu where a Coral works, else cpu where "
                             "a TFLite interpreter is installed, else emulate (it says which on stderr)")
    common.add_argument("--checkpoint", metavar="DIR",
                        help="the float checkpoint, for --backend fp32 (bundles carry no float weights)")
    common.add_argument("--route", choices=ROUTES,
                        help="where a TPU layer's calls go (edgetpu and emulate backends): tpu; cpu (the cpu "
                             "flavor); auto, each call by its rows to the side the build's cost model says is "
                             "cheaper (default: auto on edgetpu when the bundle has routes, else tpu)")
    common.add_argument("--json", action="store_true", help="print one JSON object (an error too)")
    common.add_argument("--threads", **THREADS_OPTION)
    timed = argparse.ArgumentParser(add_help=False)  # the commands whose work can be repeated for timing
    timed.add_argument("--rounds", type=at_least(1), default=1, metavar="R",
                       help="run R times after one start-up; timings are the median after the first")

    image = command("clip-image", "image embeddings", "clip-image artifacts/bundles/demo-clip cat.jpg dog.png "
                    "--out embeddings.npy", parents=[common, timed])
    image.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    image.add_argument("--image-f32le", action="store_true",
                       help="the inputs are raw little-endian float32 [3, S, S] files, already normalized")
    image.add_argument("--out", metavar="FILE.npy", type=output_file, help="also write the embeddings here")
    image.set_defaults(func=clip_command, inputs=image_embeddings)

    text = command("clip-text", "text embeddings", 'clip-text artifacts/bundles/demo-clip "a red cat" "two dogs"',
                   parents=[common, timed])
    text.add_argument("texts", nargs="+", metavar="TEXT", help="texts, each one argument (quote them)")
    text.add_argument("--out", metavar="FILE.npy", type=output_file, help="also write the embeddings here")
    text.set_defaults(func=clip_command, inputs=text_embeddings)

    zero = command("zero-shot", "label probabilities per image (CLIP: a softmax over the labels; SigLIP: each "
                   "label's own sigmoid, so a row need not sum to 1)",
                   'zero-shot artifacts/bundles/demo-clip cat.jpg --labels "cat,dog" --prompt "a photo of a {}"',
                   parents=[common, timed])
    zero.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    zero.add_argument("--labels", type=label_list, required=True, help='comma-separated, e.g. "a cat,a dog"')
    zero.add_argument("--prompt", type=label_template, default="{}", help='label template, e.g. "a photo of {}"')
    zero.add_argument("--image-f32le", action="store_true",
                      help="the inputs are raw little-endian float32 [3, S, S] files, already normalized")
    zero.set_defaults(func=clip_command, inputs=zero_shot, out=None)

    gemma = command("gemma", "generate text with a Gemma bundle, streamed",
                    'gemma artifacts/bundles/demo-gemma --prompt "please set timer" --steps 16',
                    "gemma bundles/functiongemma-270m --token-ids 2,818,5279 --lm-head tpu-lazy --shortlist 8 "
                    "--rescore 64", parents=[common, timed])
    source = gemma.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (the bundle's tokenizer adds <bos>)")
    source.add_argument("--token-ids", type=token_id_list, help="prompt as comma-separated token ids, e.g. 2,818,5279")
    gemma.add_argument("--steps", type=at_least(1), default=32, metavar="N", help="tokens to generate at most")
    gemma.add_argument("--lm-head", choices=HEAD_MODES, default="cpu",
                       help="cpu: int8 table on the host; tpu-preload: every tile ready at start; "
                            "tpu-lazy: tiles opened when needed, kept in an LRU")
    gemma.add_argument("--lm-cache-capacity", type=at_least(1), metavar="N",
                       help=f"tiles tpu-lazy keeps open (default: {DEFAULT_CAPACITY}, or every tile of a "
                            "smaller head)")
    gemma.add_argument("--shortlist", type=at_least(1), metavar="N",
                       help="run only the N tiles that scored best when they last ran (approximate; default: all)")
    gemma.add_argument("--rescore", type=at_least(1), metavar="K",
                       help="exact logits on the CPU for the TPU head's K best tokens (default: none)")
    gemma.add_argument("--temperature", type=non_negative_number, default=0.0, metavar="T",
                       help="sampling temperature; 0 is greedy")
    gemma.add_argument("--top-k", type=at_least(0), default=0, metavar="K", help="sample among the K likeliest; 0: all")
    gemma.add_argument("--seed", type=at_least(0), default=0, help="the sampler's random seed")
    gemma.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    gemma.set_defaults(func=gemma_command)

    call = command("call", "a Function-Gemma bundle: tools and a request in, the function call out",
                   'call artifacts/bundles/demo-gemma "Set a timer for 10 minutes"',
                   "call artifacts/bundles/demo-gemma --tools my-tools.json --messages conversation.json --json",
                   parents=[common])
    call.add_argument("request", nargs="?", metavar="REQUEST", help="the user's request (a last user turn)")
    call.add_argument("--tools", metavar="FILE", help="a JSON list of tools, {type: function, function: {name, "
                      "description, parameters}}, as transformers' apply_chat_template(tools=...) takes them (default: the "
                      "tools the bundle's recipe names, where it does)")
    call.add_argument("--messages", metavar="FILE", help="a JSON list of messages before REQUEST (roles developer, "
                      "system, user, model, assistant, tool), e.g. a function's result to answer")
    call.add_argument("--steps", type=at_least(1), default=128, metavar="N", help="tokens to generate at most")
    call.add_argument("--lm-head", choices=HEAD_MODES, default="cpu", help="as for gemma")
    call.add_argument("--parallel", action="store_true",
                      help="let the model make several calls in one turn (do not stop at <end_function_call>)")
    call.set_defaults(func=call_command)

    check = command("check", "is the bundle whole (sha256 of every file); which backends run here",
                    "check artifacts/bundles/demo-clip", "check bundles/demo-clip --quick --json")
    check.add_argument("bundle", help="the bundle directory (artifacts/bundles/NAME; bundles/NAME on a Pi)")
    check.add_argument("--quick", action="store_true", help="sizes only, no sha256")
    check.add_argument("--json", action="store_true", help="print one JSON object (an error too)")
    check.set_defaults(func=check_command)

    test = command("selftest", "run patched layers on the Edge TPU and compare them with emulate",
                   "selftest bundles/clip-vit-b32")
    test.add_argument("bundle", help="the bundle directory (artifacts/bundles/NAME; bundles/NAME on a Pi)")
    test.add_argument("--json", action="store_true", help="print one JSON object (an error too)")
    test.set_defaults(func=selftest_command)

    index = command("index", "embed every photo under a directory (again: only new or changed ones)",
                    "index artifacts/bundles/demo-clip ~/Pictures --out ~/pictures-index")
    index.add_argument("bundle", metavar="BUNDLE", help="a CLIP or SigLIP bundle directory (artifacts/bundles/NAME)")
    index.add_argument("photos", metavar="PHOTO_DIR", help="searched recursively for JPEG, PNG, WebP, GIF, BMP, TIFF")
    index.add_argument("--out", required=True, metavar="INDEX_DIR", help="the index (made, or brought up to date)")
    index.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                       help="where the linear layers run (auto, the default: edgetpu, else cpu, else emulate)")
    index.add_argument("--checkpoint", help="the float checkpoint directory (for --backend fp32)")
    index.add_argument("--batch", type=at_least(1), metavar="N", help=f"images per forward (default {photos.DEFAULT_BATCH}; "
                       "rounded up so the image tower's templates run full)")
    index.add_argument("--threads", **THREADS_OPTION)
    index.add_argument("--dtype", choices=photos.DTYPES, default="float16", help="of the stored embeddings")
    index.add_argument("--json", action="store_true", help="print one JSON object")
    index.set_defaults(func=index_command)

    search = command("search", "the photos of an index that best match a text or an image",
                     'search ~/pictures-index "a red circle" --top 5', "search ~/pictures-index --image query.jpg")
    search.add_argument("index", metavar="INDEX_DIR", help="made by `index`")
    search.add_argument("text", nargs="?", metavar="TEXT", help='e.g. "a dog on a beach"')
    search.add_argument("--image", metavar="FILE", help="find photos like this one (instead of TEXT)")
    search.add_argument("--top", type=at_least(1), default=5, metavar="N", help="how many matches (default 5)")
    search.add_argument("--bundle", metavar="DIR", help="the bundle, if it moved since indexing (it must be the same bundle)")
    search.add_argument("--backend", choices=("auto", *BACKENDS),
                        help="default: the one the index was made with (auto: the best this machine has)")
    search.add_argument("--checkpoint", help="the float checkpoint directory (for --backend fp32)")
    search.add_argument("--threads", **THREADS_OPTION)
    search.add_argument("--json", action="store_true", help="print one JSON object")
    search.set_defaults(func=search_command)

    serve = command("serve", "serve bundles over the OpenAI HTTP API, batching concurrent requests",
                    "serve artifacts/bundles/demo-gemma artifacts/bundles/demo-clip --port 8000",
                    "serve bundles/demo-clip --index photos=~/pictures-index --host 0.0.0.0 --api-key KEY")
    serve.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle directories; each is served under its "
                       "directory's name as the model id")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on; one reachable from other "
                       "machines needs an API key")
    serve.add_argument("--port", type=at_least(1), default=8000, help="the port to listen on")
    serve.add_argument("--api-key", help="clients must send `Authorization: Bearer KEY` (default: RUNNER_API_KEY)")
    serve.add_argument("--index", action="append", default=[], type=index_option, metavar="NAME=DIR",
                       help="a photo index made by `index`, searched at /v1/search as NAME (repeat for several)")
    serve.add_argument("--backend", choices=("auto", "emulate", "cpu", "edgetpu"), default="auto",
                       help="where the linear layers run (as for the other commands)")
    serve.add_argument("--route", choices=ROUTES, help="as for the other commands")
    serve.add_argument("--threads", **THREADS_OPTION)
    serve.add_argument("--max-batch", type=at_least(1), default=16, metavar="N",
                       help="rows per forward for embeddings; conversations decoding together for chat (1: no batching)")
    serve.add_argument("--max-wait-ms", type=non_negative_number, default=0.0, metavar="MS",
                       help="how long a request may wait for others to batch with (Triton's max_queue_delay; "
                            "default 0: a batch is what queued while the model was busy)")
    serve.add_argument("--max-queue", type=at_least(1), default=64, metavar="N",
                       help="requests waiting per bundle; more are answered 429 with Retry-After")
    serve.add_argument("--max-tokens", type=at_least(1), default=512, metavar="N",
                       help="tokens a chat request may generate at most")
    serve.add_argument("--prefix-cache-mb", type=non_negative_number, default=256.0, metavar="MB",
                       help="memory for the KV caches of shared prompt prefixes (0: none)")
    serve.add_argument("--prefix-cache", metavar="DIR", help="also keep them in DIR, so a restarted server is warm")
    serve.set_defaults(func=serve_command, json=False, bundle=None)
    return p


def index_option(text: str) -> tuple[str, str]:
    """--index NAME=DIR."""
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=DIR, e.g. photos=~/pictures-index")
    return name, str(Path(directory).expanduser())


def serve_command(args: argparse.Namespace) -> int:
    # The serve extra's packages (Starlette, uvicorn, ...): only this command needs them, and a
    # missing one is one line naming it and its install command.
    server = require("runner.serve.main", "`runner serve` runs on it (pip install -r runner/requirements-serve.txt)")
    settings = server.Settings(bundles=args.bundles, backend=args.backend, route=args.route, api_key=args.api_key,
                        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                        max_tokens=args.max_tokens, prefix_cache_mb=args.prefix_cache_mb,
                        prefix_cache_dir=args.prefix_cache, indexes=dict(args.index))
    return server.serve(settings, args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    Parser.json_errors = "--json" in argv
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # argparse fills every positional it can where it meets the first one, so in `call BUNDLE
    # --tools FILE REQUEST` the request is left over: it is the request when none came before
    if getattr(args, "command", None) == "call" and args.request is None and len(extras) == 1 \
            and not extras[0].startswith("-"):
        args.request, extras = extras[0], []
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if getattr(args, "threads", None):
        use_threads(args.threads)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader left (`| head`): nothing more to say, and nowhere to say it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ERRORS as e:
        if args.json:
            print(json.dumps({"command": args.command, "bundle": args.bundle, "error": str(e)}))
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
