"""Train the demo CLIP: a small CLIP that knows 8 colors and 4 shapes (torch, seeded).

    .venv/bin/python recipes/demo-clip/train.py            # the committed model (about 21 min on 2 cores)
    .venv/bin/python recipes/demo-clip/train.py --quick    # a smoke run (~1 min) into a temporary directory
    .venv/bin/python recipes/demo-clip/eval.py             # the acceptance metrics with the runner's numpy model

The model is Hugging Face's `CLIPModel` (so the weight names are theirs): both towers of
hidden 256, intermediate 256 and projection 256, so every linear layer is 256x256 and the
one real compiled template (256x256) serves all of them. Images are 64x64 in patches of 8;
text is at most 32 tokens of a CLIP-style byte-level BPE (`</w>` word ends, start and end
of text the last two ids) trained on the caption language by `prepare.demo_models.train_bpe`.

Data, all drawn here with Pillow on a 128x128 canvas (the runner's `preprocess` then
resizes it to 64, exactly as `runner.images.load_image` does with the PNGs):
  - one or two objects, colors red, green, blue, yellow, orange, purple, white, black and
    shapes circle, square, triangle, star, at any position and size (a quarter of the
    image side and up; two objects never overlap), standing upright give or take 10
    degrees (as people draw and photograph them);
  - a plain, gradient or noisy background of another color (one of the 8, or gray);
  - a caption in one of several phrasings: "a red circle", "a photo of a blue square",
    "a small yellow star on a black background", "something red", "a star",
    "a green triangle and a red circle", ...
Training is contrastive (CLIP's symmetric cross-entropy), with every caption in the batch
that is true of an image counted as a positive ("a red circle" is true of all the batch's
lone red circles), so repeated labels are not pushed apart. A curriculum teaches shapes
first: at the start every scene is white or black objects on a plain white, black or gray
background, and such easy scenes fade out over the first half of the steps (`--curriculum`).
Without it the model learned colors and hardly any shapes (0.41 over the 32 pairs after
600 steps; with it, 0.86 after 1200).

Seeds (numpy generators keyed by [stream, seed, index]; `--seed` changes all of them):
training batches use stream 0, the held-out images (eval and samples/) stream 1, the
calibration images stream 2, the caption files stream 3. The script also checks, by
content hash, that no training image is a held-out or calibration image.

It writes, into this directory (each file through a temporary name and a rename):
  model.safetensors       float16 weights, Hugging Face names (about 4 MB)
  config.json             the transformers CLIPConfig (text bos/eos = the tokenizer's)
  tokenizer.json          the BPE tokenizer (`tokenizers` format)
  samples/*.png           32 held-out single-object images, labels.json: name -> color, shape, label
  calibration/*.png       16 calibration images (one or two objects)
  captions.txt            48 calibration captions
  heldout-captions.txt    32 other captions, for verification
  metrics.json            the final loss and the held-out accuracies (torch and runner)

Zero-shot prompts of the metrics: "a photo of a {color} object" over the 8 colors, and
"a {color} {shape}" over the 32 color-shape pairs, on 256 held-out single-object images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))  # this checkout's runner and prepare, not an installed copy

# OpenMP threads that sleep while they wait: on a shared machine, spinning ones made a step
# five times slower (11 s instead of 2 s with other jobs running).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from runner.files import atomic_write  # noqa: E402

import eval as runner_eval  # noqa: E402  (beside this file: the metrics with the runner's numpy model)
from scenes import (  # noqa: E402  (beside this file: the scenes, captions, image sets and prompts)
    COLOR_PROMPT, EVAL_IMAGES, PAIR_PROMPT, SAMPLES, TRAIN, calibration_set, caption_corpus,
    caption_files, caption_for, describe, fingerprint, heldout_set, is_true_of, phrase, plan_scene, png, prompts,
    render, sample_name, score, twin,
)

IMAGE_SIZE, PATCH = 64, 8
CONTEXT = 32
WIDTH = 256
LAYERS = 2            # per tower


# --- the model ------------------------------------------------------------------------------

def make_tokenizer():
    """A CLIP-style byte-level BPE, as prepare.demo_models.make_tokenizer, on this caption language."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    from prepare.demo_models import train_bpe

    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    words = [w for text in caption_corpus() for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
    vocab, merges = train_bpe(words, pre_tokenizers.ByteLevel.alphabet(), 1024 - 2, "</w>")
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])  # the last two ids, as in CLIP
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return tok


def clip_config(vocab_size: int) -> dict:
    """config.json: every value the runner and transformers read, spelled out (as prepare.demo_models)."""
    tower = dict(hidden_size=WIDTH, intermediate_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=WIDTH)
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": WIDTH,
        "logit_scale_init_value": 2.6592, "dtype": "float16",
        "vision_config": dict(tower, model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=PATCH,
                              num_channels=3),
        "text_config": dict(tower, model_type="clip_text_model", vocab_size=vocab_size,
                            max_position_embeddings=CONTEXT, bos_token_id=vocab_size - 2,
                            eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
    }


def hf_config(config: dict):
    import transformers

    return transformers.CLIPConfig(**{k: v for k, v in config.items() if k not in ("model_type", "dtype")})


# --- training -------------------------------------------------------------------------------

def easy_share(step: int, steps: int, curriculum: float) -> float:
    """The share of easy scenes at `step`: all of them at first, none after `curriculum` of the steps."""
    return max(0.0, 1.0 - step / (curriculum * steps)) if curriculum > 0 else 0.0


def batch(rng: np.random.Generator, size: int, tokenize, forbidden: set[str], easy: float = 0.0):
    """`size` images in pairs, each scene with its twin of another shape (or a fresh scene), a
    caption for each, and which captions are true of which images. `easy`: the share of easy scenes."""
    from runner.images import preprocess

    pixels, texts, metas, senses = [], [], [], []
    while len(metas) < size:
        is_easy = bool(rng.uniform() < easy)
        plan = plan_scene(rng, easy=is_easy)
        plans = [plan, twin(plan, rng) or plan_scene(rng, easy=is_easy)]
        for p in plans[: size - len(metas)]:
            img, meta = render(p), describe(p)
            if fingerprint(img) in forbidden:
                raise RuntimeError("a training draw is a held-out or calibration image")
            text, sense = caption_for(meta, rng)
            pixels.append(preprocess(img, IMAGE_SIZE))
            texts.append(text), metas.append(meta), senses.append(sense)
    truth = np.array([[is_true_of(s, m) for s in senses] for m in metas], np.float32)  # [image, caption]
    return np.stack(pixels), tokenize(texts), truth


def features(model, pixels, ids):
    import torch.nn.functional as F

    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def contrastive_loss(logits, truth):
    """CLIP's symmetric cross-entropy, every true caption (image) a positive with equal share."""
    import torch

    to_text = truth / truth.sum(1, keepdim=True)
    to_image = truth / truth.sum(0, keepdim=True)
    return -0.5 * ((to_text * torch.log_softmax(logits, 1)).sum(1).mean()
                   + (to_image * torch.log_softmax(logits, 0)).sum(0).mean())


def train(args, tokenizer, config, forbidden: set[str], watch: list):
    """The trained model and the loss of every step; every --eval-every steps it prints the
    zero-shot metrics on `watch` (a few held-out images)."""
    import torch
    import transformers
    from tqdm import tqdm

    from runner.tokenizer import ClipTokenizer

    torch.manual_seed(args.seed)
    model = transformers.CLIPModel(hf_config(config)).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    tokenize = ClipTokenizer.__new__(ClipTokenizer)  # the runner's padding, on the tokenizer in memory
    tokenize.tokenizer, tokenize.context, tokenize.path = tokenizer, CONTEXT, "the tokenizer being trained"
    tokenize.eos_id = tokenize.pad_id = tokenizer.token_to_id("<|endoftext|>")
    losses = []
    bar = tqdm(range(args.steps), desc="train", unit="step", dynamic_ncols=True,
               mininterval=1 if sys.stderr.isatty() else 30)
    for step in bar:
        pixels, ids, truth = batch(np.random.default_rng([TRAIN, args.seed, step]), args.batch, tokenize, forbidden,
                                   easy_share(step, args.steps, args.curriculum))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        image, text = features(model, torch.from_numpy(pixels), torch.from_numpy(ids))
        logits = model.logit_scale.exp() * image @ text.T
        loss = contrastive_loss(logits, torch.from_numpy(truth))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", scale=f"{float(model.logit_scale.exp()):.1f}",
                        refresh=False)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            m = torch_metrics(model.eval(), tokenize, watch)
            model.train()
            bar.write(f"step {step + 1}: loss {np.mean(losses[-args.eval_every:]):.3f}, "
                      f"on {len(watch)} held-out images: colors {m['colors_top1']:.3f}, pairs {m['pairs_top1']:.3f}",
                      file=sys.stderr)
    return model.eval(), losses


# --- evaluation (torch side) ------------------------------------------------------------------

def torch_metrics(model, tok, heldout) -> dict:
    """The metrics from the torch model; `tok` texts -> padded ids (a runner.tokenize.ClipTokenizer)."""
    import torch

    from runner.images import preprocess
    colors, pairs, _ = prompts()
    with torch.no_grad():
        pixels = torch.from_numpy(np.stack([preprocess(img, IMAGE_SIZE) for img, _ in heldout]))
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).numpy()
        c = model.text_projection(model.text_model(input_ids=torch.from_numpy(tok(colors))).pooler_output).numpy()
        p = model.text_projection(model.text_model(input_ids=torch.from_numpy(tok(pairs))).pooler_output).numpy()
        scale = float(model.logit_scale.exp())
    return score(image, c, p, scale, [m for _, m in heldout])


# --- writing ----------------------------------------------------------------------------------

def write_file(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)  # runner/files.py: a temporary file, fsync, a rename


def write_dir(path: Path, files: dict[str, bytes | str]) -> None:
    """A directory of files written beside it, then swapped in (never half a directory)."""
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    for name, data in files.items():
        write_file(tmp / name, data)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model, out: Path) -> None:
    """float16 safetensors, Hugging Face names, with no shared storage."""
    from safetensors.torch import save

    tensors = {k: v.detach().to(dtype=__import__("torch").float16).contiguous().clone()
               for k, v in model.state_dict().items() if k != "text_model.embeddings.position_ids"
               and k != "vision_model.embeddings.position_ids"}
    write_file(out / "model.safetensors", save(tensors, metadata={"format": "pt"}))


def load_fp16_back(model, out: Path):
    """The model as committed: its float16 weights back in float32 (what every metric measures)."""
    import torch
    from safetensors.torch import load_file

    state = {k: v.to(torch.float32) for k, v in load_file(str(out / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few small steps, output to a temp dir")
    parser.add_argument("--out", type=Path, help="output directory (default: this script's; --quick: a temp dir)")
    parser.add_argument("--steps", type=int, help="training steps (default 1200; --quick 20)")
    parser.add_argument("--batch", type=int, help="images per step (default 128; --quick 32)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--curriculum", type=float, default=0.5,
                        help="easy scenes fade out over this share of the steps (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=100, help="print held-out metrics every N steps (0: never)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (20 if args.quick else 1200)
    args.batch = args.batch or (32 if args.quick else 128)
    out = args.out or (Path(tempfile.mkdtemp(prefix="demo-clip-quick-")) if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()

    tokenizer = make_tokenizer()
    config = clip_config(tokenizer.get_vocab_size())
    assert config["text_config"]["eos_token_id"] == tokenizer.token_to_id("<|endoftext|>")
    assert config["text_config"]["bos_token_id"] == tokenizer.token_to_id("<|startoftext|>")
    heldout = heldout_set(args.seed, 64 if args.quick else EVAL_IMAGES)
    calibration = calibration_set(args.seed)
    cal_captions, heldout_captions = caption_files(args.seed)
    forbidden = {fingerprint(img) for img, _ in heldout + calibration}
    assert len(forbidden) == len(heldout) + len(calibration), "held-out and calibration images must differ"
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens; held-out {len(heldout)} images, "
          f"calibration {len(calibration)}; training {args.steps} steps of {args.batch}", flush=True)

    model, losses = train(args, tokenizer, config, forbidden, heldout[:64])
    train_s = time.perf_counter() - t0

    # Write everything, then measure the files as written (float16 weights, saved PNGs).
    write_file(out / "tokenizer.json", tokenizer.to_str(pretty=True))
    write_file(out / "config.json", json.dumps(config, indent=2) + "\n")
    save_model(model, out)
    shipped = heldout[:SAMPLES]
    labels = {sample_name(k, m): {"color": m["objects"][0]["color"], "shape": m["objects"][0]["shape"],
                                  "label": phrase(PAIR_PROMPT.format(c=m["objects"][0]["color"], s=m["objects"][0]["shape"])),
                                  "background": m["background"], "style": m["style"],
                                  "size": m["objects"][0]["size"]}
              for k, (_, m) in enumerate(shipped)}
    write_dir(out / "samples", {**{sample_name(k, m): png(img) for k, (img, m) in enumerate(shipped)},
                                "labels.json": json.dumps(labels, indent=1) + "\n"})
    write_dir(out / "calibration", {f"{k:02d}.png": png(img) for k, (img, _) in enumerate(calibration)})
    write_file(out / "captions.txt", "\n".join(cal_captions) + "\n")
    write_file(out / "heldout-captions.txt", "\n".join(heldout_captions) + "\n")

    model = load_fp16_back(model, out)
    from runner.tokenizer import ClipTokenizer

    metrics_torch = torch_metrics(model, ClipTokenizer(out / "tokenizer.json", CONTEXT), heldout)
    metrics_runner = runner_eval.evaluate(out, heldout)
    agree = {k: round(float(np.mean(np.array(metrics_torch[f"{k}_predictions"])
                                    == np.array(metrics_runner[f"{k}_predictions"]))), 4) for k in ("colors", "pairs")}
    final_loss = float(np.mean(losses[-50:]))
    metrics = {
        "steps": args.steps, "batch": args.batch, "seed": args.seed, "lr": args.lr,
        "final_loss_last50": round(final_loss, 4), "logit_scale": round(float(model.logit_scale.exp()), 3),
        "prompts": {"colors": COLOR_PROMPT, "pairs": PAIR_PROMPT},
        "torch": {k: v for k, v in metrics_torch.items() if not k.endswith("predictions")},
        "runner": {k: v for k, v in metrics_runner.items() if not k.endswith("predictions")},
        "torch_runner_agreement": agree,
    }
    write_file(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    wall = time.perf_counter() - t0
    print(json.dumps(metrics, indent=1))
    print(f"wrote {out}; training {train_s / 60:.1f} min, total {wall / 60:.1f} min; "
          f"model.safetensors {(out / 'model.safetensors').stat().st_size / 2**20:.2f} MiB")
    ok = metrics_runner["colors_top1"] >= 0.9 and metrics_runner["pairs_top1"] >= 0.8
    if not ok:
        print("below the acceptance bar (colors >= 0.9, pairs >= 0.8)", file=sys.stderr)
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
