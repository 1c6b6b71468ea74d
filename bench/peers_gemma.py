"""Gemma on the CPU: this runner's `cpu` backend (exact int8 `cpu` LM head) beside llama.cpp
(Q8_0, through llama-cpp-python), converted from the same checkpoint, in one run with the
same thread count.

    .venv/bin/pip install -e '.[test,bench]'       # llama-cpp-python compiles llama.cpp (~12 min)
    .venv/bin/python bench/peers_gemma.py CHECKPOINT BUNDLE [--threads 1] [--rounds 9]

CHECKPOINT is a Gemma-3 checkpoint directory and BUNDLE the bundle `doit` built from it with
the `cpu` flavor (bench/gemma_270m.py makes both at 270M's real size: random weights).

The peer's model: llama.cpp's own converter (`convert_hf_to_gguf.py --outtype q8_0`, from
the llama-cpp-python source of the installed version: `pip download` fetches it once) turns
the checkpoint into a GGUF file in <artifacts>/bench-peers-gemma/. The converter cuts the
embedding to the tokenizer's pieces; with a SentencePiece `tokenizer.model` it pads the
piece list to the config's vocabulary, so a small one (trained here, seeded) keeps all
262,144 rows of the head, as large as the runner's: checked on the file.

Work (the same token ids on both sides): the prefill of 256 tokens (logits of the last
position), and decoding, ms per token over 16 tokens after a 16-token prompt, twice: greedy
(the runner's head adds its second int8 part only to the tokens that could win) and sampling
at temperature 0.7 over every token (the head computes every logit that could be drawn;
llama.cpp samples with its own temperature and distribution samplers). The peer runs with
flash attention on, what llama.cpp's own default (`auto`) picks on the CPU, and off
(llama-cpp-python's `flash_attn=False` default): two peers. Each round runs every side once
per work, after a warm-up, the sides in turn and in the reverse order every other round (so
no side always runs first, on a cache the one before it left cold). ratio = runner time /
peer time (above 1: the runner is slower), per round; reported: its median over the rounds,
and its minimum and maximum (a goal is met only when the maximum is under it), and each
side's median ms. BLAS/OpenMP threads (environment, set before numpy loads), the
interpreter's `num_threads` and llama.cpp's `n_threads` / `n_threads_batch` all get
`--threads`. The prefill's last logits' cosine to the float model (transformers, float32) on
both sides is supporting evidence that both run the same model. Results:
bench/results/peers-gemma-<date>.json, keys `peers.gemma.<work>.<peer>.ratio`, `ratio_min`,
`ratio_max`, `rounds`, and the load average before and after.
"""

from __future__ import annotations

import os
import sys

THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = THREADS  # before numpy and torch load their thread pools

import datetime  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, peer_arguments, peer_ratios, use_artifacts  # noqa: E402

ARTIFACTS = use_artifacts("bench-peers-gemma")  # before prepare.store is imported: it fixes the artifacts directory
from prepare.store import atomic_write  # noqa: E402
from runner.generate import Sampler, generate  # noqa: E402
from runner.interpreter import use_threads  # noqa: E402
from runner.load import load  # noqa: E402

PEER = "llama.cpp-q8_0"  # flash attention on (llama.cpp's `auto` on the CPU); PEER + FLASH_OFF: off
FLASH_OFF = "-flash-attn-off"
PREFILL, PROMPT, STEPS = 256, 16, 16
TEMPERATURE = 0.7  # the sampling work's
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with its `conversion` package and gguf-py) from the
    source distribution of the installed llama-cpp-python, unpacked once."""
    version = importlib.metadata.version("llama-cpp-python")
    out = ARTIFACTS / f"llama.cpp-{version}"
    script = out / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    download = ARTIFACTS / "sdist"
    print(f"fetching llama-cpp-python {version}'s source for its converter (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", str(download)], check=True)
    archive = next(download.glob("llama_cpp_python-*.tar.gz"))
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archive) as tar:
        prefix = f"{tar.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and m.name[len(prefix):].startswith(CONVERTER_FILES)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(staging, members=members, filter="data")  # no links or paths out of staging
    staging.rename(out)
    shutil.rmtree(download)
    return script


def sentencepiece_model(pieces: int = 512) -> bytes:
    """A small SentencePiece model (BPE with byte fallback, seeded corpus): the converter
    needs one for Gemma; the benchmark feeds token ids, so which pieces it holds does not matter."""
    import sentencepiece

    from prepare.demo_models import gemma_corpus
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(gemma_corpus() * 4), model_writer=model, vocab_size=pieces, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    return model.getvalue()


def gguf_file(checkpoint: Path) -> Path:
    """The checkpoint as llama.cpp Q8_0 GGUF, made once per checkpoint (its config, and its
    weights file's size and time, name the file); its embedding must keep every row."""
    config_text = (checkpoint / "config.json").read_text()
    weights = (checkpoint / "model.safetensors").stat()
    key = hashlib.sha256(f"{config_text}{weights.st_size}{weights.st_mtime_ns}".encode()).hexdigest()[:16]
    out = ARTIFACTS / f"model-q8_0-{key}.gguf"
    config = json.loads(config_text)
    if not out.is_file():
        source = ARTIFACTS / "hf"
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir(parents=True)
        atomic_write(source / "config.json", json.dumps(config))
        (source / "model.safetensors").symlink_to((checkpoint / "model.safetensors").resolve())
        (source / "tokenizer.model").write_bytes(sentencepiece_model())
        partial = out.with_suffix(".partial")
        print("converting the checkpoint to GGUF Q8_0 (once) ...", flush=True)
        subprocess.run([sys.executable, str(converter()), str(source), "--outtype", "q8_0", "--outfile", str(partial)],
                       check=True, stdout=subprocess.DEVNULL)
        partial.rename(out)
        for stale in ARTIFACTS.glob("model-q8_0-*.gguf"):  # other checkpoints' conversions
            if stale != out:
                stale.unlink()
    sys.path.insert(0, str(converter().parent / "gguf-py"))
    from gguf import GGUFReader
    shape = {t.name: [int(n) for n in t.shape] for t in GGUFReader(out).tensors}["token_embd.weight"]
    if shape != [config["hidden_size"], config["vocab_size"]]:
        raise SystemExit(f"{out}: token_embd is {shape}, not {config['hidden_size']} x {config['vocab_size']}")
    return out


def float_logits(checkpoint: Path, ids: list[int]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.Gemma3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


class RunnerSide:
    """The runner as `runner gemma --backend cpu --lm-head cpu` runs it, in-process."""

    def __init__(self, bundle: Path):
        self.loaded = load(bundle, "cpu", lm_head="cpu")

    def prefill(self, ids: list[int]) -> float:
        step = next(generate(self.loaded.model, self.loaded.head, ids, 1, Sampler()))
        return step.ms

    def decode(self, ids: list[int], steps: int, temperature: float = 0.0) -> float:
        sampler = Sampler(temperature=temperature)
        times = [s.ms for s in generate(self.loaded.model, self.loaded.head, ids, steps + 1, sampler)]
        return statistics.mean(times[1:])  # after the prefill

    def last_logits(self, ids: list[int]) -> np.ndarray:
        from runner.gemma import KVCache
        model = self.loaded.model
        h = model.forward(np.asarray(ids, np.int64), KVCache(model.config))[-1]
        return model.softcap(self.loaded.head(h))


class LlamaSide:
    """llama.cpp through llama-cpp-python's low-level `eval` and the context's last logits
    (`eval` keeps none unless every position's are asked for): the same greedy loop; when
    sampling, llama.cpp's own samplers (temperature, then a seeded draw) on those logits.
    `flash_attn` on is what llama.cpp's default, `auto`, picks on the CPU; off is
    llama-cpp-python's default."""

    def __init__(self, path: Path, threads: int, flash_attn: bool):
        from llama_cpp import Llama
        self.llm = Llama(str(path), n_ctx=PREFILL + 64, n_batch=PREFILL, n_threads=threads,
                         n_threads_batch=threads, flash_attn=flash_attn, verbose=False)

    def sampler(self, temperature: float):
        import llama_cpp
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(0))
        return chain

    def logits(self) -> np.ndarray:
        import llama_cpp
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def prefill(self, ids: list[int]) -> float:
        t = time.perf_counter()
        self.llm.reset()
        self.llm.eval(ids)
        int(np.argmax(self.logits()))
        return (time.perf_counter() - t) * 1e3

    def decode(self, ids: list[int], steps: int, temperature: float = 0.0) -> float:
        import llama_cpp
        chain = self.sampler(temperature) if temperature else None
        self.llm.reset()
        self.llm.eval(ids)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            if chain is None:
                token = int(np.argmax(self.logits()))
            else:
                token = llama_cpp.llama_sampler_sample(chain, self.llm.ctx, -1)
            self.llm.eval([token])
            times.append((time.perf_counter() - t) * 1e3)
        if chain is not None:
            llama_cpp.llama_sampler_free(chain)
        return statistics.mean(times)

    def last_logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return self.logits().copy()


def main() -> None:
    args = peer_arguments(__doc__)
    import llama_cpp

    use_threads(args.threads)
    load_before = os.getloadavg()
    vocab = json.loads((args.checkpoint / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(5)
    long_ids = [2] + rng.integers(4, vocab, PREFILL - 1).tolist()
    short_ids = long_ids[:PROMPT]
    gguf = gguf_file(args.checkpoint)
    sides = {"runner": RunnerSide(args.bundle), PEER: LlamaSide(gguf, args.threads, flash_attn=True),
             PEER + FLASH_OFF: LlamaSide(gguf, args.threads, flash_attn=False)}
    work = {"prefill 256": lambda side: side.prefill(long_ids),
            "decode": lambda side: side.decode(short_ids, STEPS),
            "decode, sampling": lambda side: side.decode(short_ids, STEPS, TEMPERATURE)}
    logits = {name: side.last_logits(long_ids) for name, side in sides.items()}  # also the warm-up
    for run in work.values():
        for side in sides.values():
            run(side)
    times = {w: {name: [] for name in sides} for w in work}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]  # who runs first alternates
        for w, run in work.items():
            for name in order:
                times[w][name].append(run(sides[name]))
        print(f"round {r + 1}: " + "; ".join(f"{w}: " + ", ".join(f"{name} {times[w][name][-1]:.1f}"
                                                                  for name in sides) for w in work) + " ms",
              flush=True)

    reference = float_logits(args.checkpoint, long_ids)
    peers = peer_ratios(times)
    result = {
        "date": datetime.date.today().isoformat(), "checkpoint": str(args.checkpoint), "bundle": str(args.bundle),
        "threads": args.threads, "rounds": args.rounds,
        "load_average": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]},
        "llama_cpp_python": llama_cpp.__version__, "prefill_tokens": PREFILL,
        "decode": {"prompt_tokens": PROMPT, "tokens": STEPS, "sampling_temperature": TEMPERATURE},
        "peers": {"gemma": peers},
        "logits_cosine_to_float": {name: round(cosine(v, reference), 5) for name, v in logits.items()},
        "same_top1_as_float": {name: bool(np.argmax(v) == np.argmax(reference)) for name, v in logits.items()},
    }
    out = ROOT / "bench" / "results" / f"peers-gemma-{result['date']}.json"
    atomic_write(out, json.dumps(result, indent=1) + "\n")
    print("| work | runner (cpu, cpu head) | peer | peer ms | ratio, median (min-max) of rounds |")
    print("| --- | --- | --- | --- | --- |")
    for w, p in peers.items():
        for name in sides:
            if name != "runner":
                q = p[name]
                print(f"| {w} | {p['runner_ms']:.1f} ms | {name} | {q['ms']:.1f} ms | "
                      f"{q['ratio']:.2f} ({q['ratio_min']:.2f}-{q['ratio_max']:.2f}) |")
    print("last logits' cosine to float:", json.dumps(result["logits_cosine_to_float"]))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
