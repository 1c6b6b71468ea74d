"""The demo CLIP's world: the scenes it is trained and evaluated on, drawn with Pillow on a
128x128 canvas, their captions, the fixed image sets by seed stream, the zero-shot prompts
and their scoring (train.py says what is drawn and why). Both train.py and eval.py draw on
it; neither imports the other's script for it.
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np

from runner.contrastive import unit_rows  # the one L2 normalization (the runner is on sys.path: train.py, eval.py)

COLORS = {  # name -> RGB; drawn with a small per-channel jitter
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "orange": (245, 140, 20), "purple": (140, 40, 180), "white": (245, 245, 245), "black": (15, 15, 15),
}
BACKGROUNDS = {**COLORS, "gray": (128, 128, 128)}
SHAPES = ["circle", "square", "triangle", "star"]
CANVAS = 128          # drawn size; the model sees it resized to IMAGE_SIZE
SMALL, LARGE = 0.35, 0.5  # object size (fraction of the side) under which it is "small", over which "large"
STYLES = ["plain", "gradient", "noise"]
# The curriculum's easy scenes: shapes are learned first where their edges are plain to see
# (white or black on white, black or gray), then on every color (see `easy_share`).
EASY_COLORS, EASY_BACKGROUNDS = ["white", "black"], ["white", "black", "gray"]
TILT = 10            # degrees: polygons stand upright (square level, triangle and star point up), give or take

TRAIN, HELDOUT, CALIBRATION, CAPTIONS = 0, 1, 2, 3  # seed streams
EVAL_IMAGES, SAMPLES, CALIBRATION_IMAGES = 256, 32, 16
COLOR_PROMPT, PAIR_PROMPT = "a photo of a {c} object", "a {c} {s}"

# Caption templates. {c} color, {s} shape, {z} size word, {b} background color.
FULL = ["a {c} {s}", "a photo of a {c} {s}", "a picture of a {c} {s}", "a drawing of a {c} {s}",
        "there is a {c} {s}", "a {s} that is {c}", "one {c} {s}", "a {c} {s} in the picture"]
SIZED = ["a {z} {c} {s}", "a photo of a {z} {c} {s}"]
WITH_BG = ["a {c} {s} on a {b} background", "a photo of a {c} {s} on a {b} background",
           "a {z} {c} {s} on a {b} background"]
COLOR_ONLY = ["a {c} object", "a photo of a {c} object", "something {c}", "a {c} shape",
              "something {c} on a {b} background"]
SHAPE_ONLY = ["a {s}", "a photo of a {s}", "a {s} on a {b} background"]
TWO = ["a {c} {s} and a {c2} {s2}", "a photo of a {c} {s} and a {c2} {s2}", "a {c} {s} next to a {c2} {s2}",
       "a {c} {s} and a {c2} {s2} on a {b} background", "two shapes: a {c} {s} and a {c2} {s2}"]
SIZE_WORDS = {"small": ["small", "little"], "large": ["big", "large"]}


# --- drawing -------------------------------------------------------------------------------

def phrase(text: str) -> str:
    """English articles: "a orange circle" -> "an orange circle", "a object" -> "an object"."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _jitter(rgb, rng, amount=18):
    return tuple(int(v) for v in np.clip(np.array(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255))


_YY, _XX = (np.mgrid[:CANVAS, :CANVAS].astype(np.float32) / (CANVAS - 1) - 0.5)


def _background(plan: dict) -> np.ndarray:
    base = np.array(plan["background_rgb"], np.float32)
    img = np.broadcast_to(base, (CANVAS, CANVAS, 3))
    if plan["style"] == "gradient":  # one hue, from a darker shade to a lighter one, in any direction
        angle = plan["gradient_angle"]
        t = (np.cos(angle) * _XX + np.sin(angle) * _YY) / np.sqrt(0.5) + 0.5  # 0..1 across the image
        dark, light = base * 0.7, base + (255 - base) * 0.25
        img = dark + (light - dark) * t[..., None]
    elif plan["style"] == "noise":
        noise = np.random.default_rng(plan["noise_seed"]).standard_normal(img.shape, np.float32)
        img = img + plan["noise_sigma"] * noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, s: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        radius, points, offset = s / 2 * math.sqrt(2), 4, math.pi / 4
        radii = [radius] * 4
    elif shape == "triangle":
        radius, points, offset = s * 0.6, 3, -math.pi / 2
        radii = [radius] * 3
    else:  # a five-pointed star
        radius, points, offset = s * 0.58, 10, -math.pi / 2
        radii = [radius if k % 2 == 0 else radius * 0.42 for k in range(10)]
    return [(cx + r * math.cos(offset + angle + 2 * math.pi * k / points),
             cy + r * math.sin(offset + angle + 2 * math.pi * k / points)) for k, r in enumerate(radii)]


def _reach(shape: str, s: float) -> float:
    """The radius of the circle around the shape (centered on it), whatever its rotation."""
    return {"circle": s / 2, "square": s / 2 * math.sqrt(2), "triangle": s * 0.6, "star": s * 0.58}[shape]


def plan_scene(rng: np.random.Generator, n_objects: int | None = None, easy: bool = False) -> dict:
    """What to draw: the background and one or two objects (color, shape, size, place, rotation).
    `easy`: white or black objects on a plain white, black or gray background (the curriculum's)."""
    n = n_objects or (1 if rng.uniform() < 0.6 else 2)
    colors = EASY_COLORS if easy else COLORS_LIST
    while True:  # two different (color, shape) objects
        objs = [(colors[int(rng.integers(len(colors)))], SHAPES[int(rng.integers(4))]) for _ in range(n)]
        if len(set(objs)) == n:
            break
    used = {c for c, _ in objs}
    bg_choices = [b for b in (EASY_BACKGROUNDS if easy else BACKGROUNDS) if b not in used]
    bg = bg_choices[int(rng.integers(len(bg_choices)))]
    styles = ["plain"] if easy else STYLES
    plan = {"background": bg, "background_rgb": _jitter(BACKGROUNDS[bg], rng, 12),
            "style": styles[int(rng.integers(len(styles)))],
            "gradient_angle": float(rng.uniform(0, 2 * np.pi)), "noise_sigma": float(rng.uniform(15, 40)),
            "noise_seed": int(rng.integers(2**63))}
    hi = 0.65 if n == 1 else 0.38
    placed: list = []
    while len(placed) < n:  # sizes and positions at random; start again when the objects overlap
        color, shape = objs[len(placed)]
        size = float(rng.uniform(0.25, hi))
        r = _reach(shape, size * CANVAS)
        cx, cy = (float(v) for v in rng.uniform(r, CANVAS - r, 2))
        if all(math.hypot(cx - o["cx"], cy - o["cy"]) > r + o["reach"] + 2 for o in placed):
            placed.append({"color": color, "shape": shape, "size": size, "cx": cx, "cy": cy, "reach": r,
                           "angle": math.radians(float(rng.uniform(-TILT, TILT))), "fill": _jitter(COLORS[color], rng)})
        elif rng.uniform() < 0.2:
            placed = []
    plan["objects"] = placed
    return plan


def twin(plan: dict, rng: np.random.Generator) -> dict | None:
    """The same scene with one object of another shape (same color, place, size and background):
    a hard negative for shape. None when no other shape fits there."""
    k = int(rng.integers(len(plan["objects"])))
    o = plan["objects"][k]
    others = [x for j, x in enumerate(plan["objects"]) if j != k]
    for shape in rng.permutation([s for s in SHAPES if s != o["shape"]]):
        r = _reach(str(shape), o["size"] * CANVAS)
        cx, cy = min(max(o["cx"], r), CANVAS - r), min(max(o["cy"], r), CANVAS - r)
        if any((x["color"], x["shape"]) == (o["color"], shape) or math.hypot(cx - x["cx"], cy - x["cy"])
               <= r + x["reach"] + 2 for x in others):
            continue
        objects = list(plan["objects"])
        objects[k] = dict(o, shape=str(shape), cx=cx, cy=cy, reach=r)
        return dict(plan, objects=objects)
    return None


def render(plan: dict):
    """The plan as a PIL image (CANVAS x CANVAS), the same pixels every time."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(_background(plan))
    draw = ImageDraw.Draw(img)
    for o in plan["objects"]:
        cx, cy, r = o["cx"], o["cy"], o["reach"]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o["fill"])
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, o["size"] * CANVAS, o["angle"]), fill=o["fill"])
    return img


def describe(plan: dict) -> dict:
    """What captions and labels say about a scene: {"objects": [{color, shape, size}], "background", "style"}."""
    return {"objects": [{"color": o["color"], "shape": o["shape"], "size": round(o["size"], 3)}
                        for o in plan["objects"]],
            "background": plan["background"], "style": plan["style"]}


def draw_scene(rng: np.random.Generator, n_objects: int | None = None):
    """A PIL image and what is in it (describe)."""
    plan = plan_scene(rng, n_objects)
    return render(plan), describe(plan)


COLORS_LIST = list(COLORS)


def size_class(s: float) -> str:
    return "small" if s < SMALL else "large" if s > LARGE else "medium"


# --- captions --------------------------------------------------------------------------------
# A caption's meaning: (objects, background), each object (color, shape, size class), None
# where the caption does not say. It is true of an image with as many objects, matched in
# some order, and the background it names.

def caption_for(meta: dict, rng: np.random.Generator) -> tuple[str, tuple]:
    objs, bg = meta["objects"], meta["background"]
    if len(objs) == 2:
        (a, b) = objs if rng.uniform() < 0.5 else objs[::-1]
        template = TWO[int(rng.integers(len(TWO)))]
        text = phrase(template.format(c=a["color"], s=a["shape"], c2=b["color"], s2=b["shape"], b=bg))
        sense = (((a["color"], a["shape"], None), (b["color"], b["shape"], None)), bg if "{b}" in template else None)
        return text, sense
    o = objs[0]
    z = size_class(o["size"])
    u = rng.uniform()
    if u < 0.5:
        templates = FULL
    elif u < 0.62 and z != "medium":
        templates = SIZED
    elif u < 0.75:
        templates = [t for t in WITH_BG if "{z}" not in t or z != "medium"]
    elif u < 0.9:
        templates = COLOR_ONLY
    else:
        templates = SHAPE_ONLY
    template = templates[int(rng.integers(len(templates)))]
    word = SIZE_WORDS[z][int(rng.integers(2))] if z != "medium" else ""
    text = phrase(template.format(c=o["color"], s=o["shape"], z=word, b=bg))
    sense = (((o["color"] if "{c}" in template else None, o["shape"] if "{s}" in template else None,
               z if "{z}" in template else None),), bg if "{b}" in template else None)
    return text, sense


def is_true_of(sense: tuple, meta: dict) -> bool:
    said, bg = sense
    objs = meta["objects"]
    if len(said) != len(objs) or (bg is not None and bg != meta["background"]):
        return False

    def fits(s, o):
        return all(v is None or v == w for v, w in zip(s, (o["color"], o["shape"], size_class(o["size"]))))

    if len(said) == 1:
        return fits(said[0], objs[0])
    return (fits(said[0], objs[0]) and fits(said[1], objs[1])) or (fits(said[0], objs[1]) and fits(said[1], objs[0]))


def caption_corpus() -> list[str]:
    """Every caption the templates can make (the tokenizer's training text), in a fixed order."""
    out = []
    for c in COLORS:
        for s in SHAPES:
            for b in BACKGROUNDS:
                for z in sum(SIZE_WORDS.values(), []):
                    for t in FULL + SIZED + WITH_BG + COLOR_ONLY + SHAPE_ONLY:
                        out.append(phrase(t.format(c=c, s=s, z=z, b=b)))
            for c2 in COLORS:
                for s2 in SHAPES:
                    out += [phrase(t.format(c=c, s=s, c2=c2, s2=s2, b="gray")) for t in TWO]
    return out


# --- the fixed image sets -------------------------------------------------------------------

def fingerprint(img) -> str:
    return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()


def heldout_set(seed: int, n: int = EVAL_IMAGES):
    """The held-out single-object images: (PIL image, meta) each; the first SAMPLES ship as samples/."""
    return [draw_scene(np.random.default_rng([HELDOUT, seed, k]), 1) for k in range(n)]


def calibration_set(seed: int, n: int = CALIBRATION_IMAGES):
    return [draw_scene(np.random.default_rng([CALIBRATION, seed, k])) for k in range(n)]


def sample_name(k: int, meta: dict) -> str:
    o = meta["objects"][0]
    return f"{k:02d}-{o['color']}-{o['shape']}.png"


def caption_files(seed: int) -> tuple[list[str], list[str]]:
    """48 calibration captions and 32 other held-out ones (no line in both), from fresh scenes."""
    rng = np.random.default_rng([CAPTIONS, seed])
    calibration, heldout = [], []
    while len(calibration) < 48 or len(heldout) < 32:
        _, meta = draw_scene(rng)
        text, _ = caption_for(meta, rng)
        if text in calibration or text in heldout:
            continue
        (calibration if len(calibration) < 48 else heldout).append(text)
    return calibration, heldout


# --- zero-shot prompts, their score, PNG bytes ----------------------------------------------

def prompts() -> tuple[list[str], list[str], list[tuple[str, str]]]:
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    return ([phrase(COLOR_PROMPT.format(c=c)) for c in COLORS], [phrase(PAIR_PROMPT.format(c=c, s=s)) for c, s in pairs],
            pairs)


def score(image_emb: np.ndarray, color_emb: np.ndarray, pair_emb: np.ndarray, scale: float, metas: list[dict]) -> dict:
    """Zero-shot top-1 over the 8 colors and over the 32 pairs, and the mean softmax margin of the winner."""
    image_emb, color_emb, pair_emb = unit_rows(image_emb), unit_rows(color_emb), unit_rows(pair_emb)
    _, _, pairs = prompts()
    truth_color = np.array([COLORS_LIST.index(m["objects"][0]["color"]) for m in metas])
    truth_pair = np.array([pairs.index((m["objects"][0]["color"], m["objects"][0]["shape"])) for m in metas])
    out = {"images": len(metas)}
    for name, emb, truth in (("colors", color_emb, truth_color), ("pairs", pair_emb, truth_pair)):
        logits = scale * image_emb @ emb.T
        top2 = np.sort(logits, 1)[:, -2:]
        out[f"{name}_top1"] = round(float((logits.argmax(1) == truth).mean()), 4)
        out[f"{name}_logit_margin"] = round(float((top2[:, 1] - top2[:, 0]).mean()), 3)
        out[f"{name}_predictions"] = logits.argmax(1).tolist()
    return out


def png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


