"""Gemma's tied LM head: the final hidden state [hidden] -> logits [vocab], four ways.

- `cpu`: the embedding table as int8 rows with a float32 scale per row. On the `cpu` and
  `edgetpu` backends, where the bundle has them (manifest `int8_head`), it runs as
  int8 x int8 products in TFLite's hybrid fully connected kernel (XNNPACK's), one call per
  tile of rows, never widening the table. The hidden state h counts as two int8 parts, its
  codes and what those left of it (`two_parts`); the two parts' sum is h . row to about
  1e-5 of the largest logit, as exact as a float h against the int8 table. The kernel reads
  the table once for all the rows of a call (1 row: 4.6 ms at 270M, 2 rows 5.4 ms, 4 rows
  5.8 ms; TFLite's builtin kernel reads it once per row: 6.1, 11.0, 20.6 ms), so a call
  without a margin, or with one above zero (sampling), runs both parts of h in one pass and
  gets every logit's two-part value; the serve engine's sequences decoding together share
  that pass too (`rows`). Greedy decoding (margin 0) needs only the best token exact: only
  the first part runs over the whole table, and since the second part's share of any
  logit is at most |second part| * |row| (Cauchy-Schwarz; `weight_norm`, per row), just
  the tokens that could still be the best get it added, in numpy, from their rows
  (`Int8Table.second_part`). Elsewhere (emulate, or an older bundle) numpy computes float
  h against the table memory-mapped from `host.safetensors` (the same table is the input
  embedding), in chunks so no float copy of the whole table is made.
- `tpu-preload`: every tile (a `hidden x tile_rows` Dense template; manifest `lm_head`)
  ready at start-up.
- `tpu-lazy`: tiles opened when first needed and kept in an LRU of `capacity` tiles;
  the least recently used one is closed when another must open.
- `fp32`: the float table of a checkpoint (the `fp32` backend's head).

Two options of the TPU heads:
- `shortlist N`: run only N tiles per step, the N whose best logit was highest the
  last time each was run (the first step runs them all). Approximate, as the
  reference project's shortlist: a token in a tile left out cannot be chosen.
- `rescore K`: the TPU logits choose K candidates and the int8 table gives their
  exact logits (the `cpu` head's values: the same two int8 parts, in numpy); every
  other token gets -inf. Greedy decoding then equals the `cpu` head's whenever its
  best token is among the K.

Logits a head does not compute are -inf. Counters (`HeadStats`) say per step what
the head did: tiles run, LRU hits, misses and evictions, tokens rescored.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from .bundle import Bundle, BundleError, Int8Head
from .errors import UserError
from .executors import InterpreterTooOld, TemplateInterpreter, check_flavor, quantized_layer

HEAD_MODES = ("cpu", "tpu-preload", "tpu-lazy")
DEFAULT_CAPACITY = 8  # tiles tpu-lazy keeps open unless told: 40 MiB of 640 x 8192 int8 tiles
EMBEDDING = "model.embed_tokens"
CHUNK_ROWS = 16384  # rows of the int8 table turned into float32 at a time (16384 x 640 x 4 = 40 MB)
CANDIDATE_LIMIT = 8192  # tokens given their second part in numpy; beyond, it runs over the whole table


class HeadError(UserError):
    """Head options that do not fit together or do not fit the bundle."""


@dataclass
class HeadStats:
    tiles: int = 0  # tiles run
    hits: int = 0  # tiles found open in the LRU
    misses: int = 0  # tiles that had to be opened
    evictions: int = 0  # tiles closed to make room
    rescored: int = 0  # candidate tokens given exact logits

    def take(self) -> dict:
        """These counts, reset to zero."""
        out = asdict(self)
        self.__init__()
        return out


def on_grid(x: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each row of x [n, d] as its int8 part: scale s over [min(row, 0), max(row, 0)] in 255
    steps, zero point zp in [-128, 127] and codes q (the smallest -128, the largest 127), as
    the rows s (q - zp) [n, d] and (s [n], zp [n], q [n, d]). A hybrid kernel quantizes each
    row over its own range in 255 steps; handed a row already on such a grid and spanning it,
    it reads back exactly these codes, whatever its rounding rule (TFLite's builtin kernel
    rounds halves away from zero, XNNPACK's to even): the logits are then known integer
    products, and what the codes leave of x is exactly x minus this row. An all-zero row has
    scale 1, zero point 0 and codes 0."""
    x = np.asarray(x, np.float32)
    lows, highs = x.min(axis=1), x.max(axis=1)
    scales, zero_points = [], []
    for lo, hi in zip(lows.tolist(), highs.tolist()):  # a few rows: their scalars in Python
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = (hi - lo) / 255.0 if hi > lo else 1.0
        scales.append(s)
        zero_points.append(min(127, max(-128, round(-128.0 - lo / s))) if hi > lo else 0)
    s, zp = np.array(scales, np.float32)[:, None], np.array(zero_points, np.int32)[:, None]
    q = np.rint(x / s)
    q += zp
    np.minimum(q, 127, out=q)
    np.maximum(q, -128, out=q)
    q = q.astype(np.int32)
    # the ends of the range are codes -128 and 127 (a 0 end is the kernel's own)
    negative, positive = np.flatnonzero(lows < 0), np.flatnonzero(highs > 0)
    if len(negative):
        q[negative, x[negative].argmin(axis=1)] = -128
    if len(positive):
        q[positive, x[positive].argmax(axis=1)] = 127
    return (q - zp).astype(np.float32) * s, (s[:, 0], zp[:, 0], q)


def two_parts(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
    """Each row of h [n, hidden] as the two rows the int8 head runs, each on the kernel's grid
    (`on_grid`): h's int8 parts [n, hidden] and the int8 parts of what those leave, with the
    (s, zp, q) of each."""
    h = np.asarray(h, np.float32)
    first, codes = on_grid(h)
    second, rest_codes = on_grid(h - first)
    return first, second, codes, rest_codes


def row_part(codes: tuple[np.ndarray, np.ndarray, np.ndarray], i: int) -> tuple[np.float32, int, np.ndarray]:
    """Row i's (s, zp, q) of `on_grid`'s codes."""
    s, zp, q = codes
    return s[i], int(zp[i]), q[i]


def two_part_rows(h: np.ndarray) -> tuple[np.ndarray, list]:
    """One hidden state h [hidden] as its two rows [2, hidden] (`two_parts`) and their (s, zp, q)."""
    first, second, codes, rest_codes = two_parts(np.asarray(h, np.float32)[None])
    return np.concatenate([first, second]), [row_part(codes, 0), row_part(rest_codes, 0)]


class Int8Table:
    """The tied embedding as int8 rows and a float32 scale per row (read-only views of the bundle)."""

    def __init__(self, host, name: str = EMBEDDING):
        self.q, self.scale = host[f"{name}.weight_int8"], host[f"{name}.weight_scale"]
        if self.q.ndim != 2 or self.scale.shape != self.q.shape[:1]:
            raise BundleError(f"{host.path}: {name}.weight_int8 {list(self.q.shape)} and "
                              f"{name}.weight_scale {list(self.scale.shape)} do not fit together")
        self._norms = host[f"{name}.weight_norm"] if f"{name}.weight_norm" in host else None
        if self._norms is not None and self._norms.shape != self.scale.shape:
            raise BundleError(f"{host.path}: {name}.weight_norm has shape {list(self._norms.shape)}, "
                              f"the table has {len(self.q)} rows")

    @property
    def norms(self) -> np.ndarray:
        """Each row's Euclidean length, scale included (the bundle's `weight_norm`; computed
        once here for a bundle built before it had them)."""
        if self._norms is None:
            self._norms = row_norms(self.q, self.scale)
        return self._norms

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.q[ids].astype(np.float32) * self.scale[ids, None]

    def logits(self, h: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """h . row * scale: for the given rows, as the int8 head computes them (two int8 parts
        of h, integer products: its values, to float rounding); for all rows (no int8 head
        here), float h against the table."""
        h = np.asarray(h, np.float32)
        if rows is not None:
            q = self.q[rows].astype(np.int32)
            _, parts = two_part_rows(h)
            return sum((q @ (c - zp)).astype(np.float32) * (s * self.scale[rows]) for s, zp, c in parts)
        out = np.empty(len(self.q), np.float32)
        for a in range(0, len(self.q), CHUNK_ROWS):
            out[a : a + CHUNK_ROWS] = (self.q[a : a + CHUNK_ROWS].astype(np.float32) @ h) * self.scale[a : a + CHUNK_ROWS]
        return out

    def second_part(self, part: tuple, rows: np.ndarray) -> np.ndarray:
        """One int8 part (s, zp, codes) of a hidden state against the given rows, as the
        hybrid kernel computes it."""
        s, zp, codes = part
        return (self.q[rows].astype(np.int32) @ (codes - zp)).astype(np.float32) * (s * self.scale[rows])


def row_norms(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """|scale_j * q_j| for every row j of an int8 table, in integers chunk by chunk."""
    out = np.empty(len(q), np.float32)
    for a in range(0, len(q), CHUNK_ROWS):
        c = q[a : a + CHUNK_ROWS].astype(np.int16)
        out[a : a + CHUNK_ROWS] = np.sqrt(np.einsum("ij,ij->i", c, c, dtype=np.int32).astype(np.float64))
    return (out * scale).astype(np.float32)


class Int8Tiles:
    """The bundle's `int8_head`: the table as hybrid TFLite models, each run on h's two int8 parts."""

    def __init__(self, head: Int8Head, open_all: bool = False):
        self.head = head
        self.models: list[TemplateInterpreter | None] = [None] * len(head.files)
        # An interpreter too old for the tiles' ops says so at start-up, where the head can
        # still fall back to numpy: the first tile is opened now with the builtin kernels, which
        # check the ops without packing the weights (XNNPACK's packing took Gemma's start-up from
        # 7 to 16 ms). The tiles open on first use, as the layers do; `open_all` opens them now.
        if open_all:
            for i in range(len(head.files)):
                self.model(i)
        else:
            TemplateInterpreter(head.files[0].path, xnnpack=False)

    def model(self, i: int) -> TemplateInterpreter:
        if self.models[i] is None:
            f, head = self.head.files[i], self.head
            # With XNNPACK (the interpreter's default): it packs its own copy of the tile as it opens
            # (the file's pages are given back: `kept`) and reads it once for all of a call's rows,
            # where the builtin kernel reads it once per row (module docstring).
            m = TemplateInterpreter(f.path, kept=True)
            if (m.batch, m.n_in) != (head.batch, head.n_in) or head.batch != 2:
                raise BundleError(f"{f.path}: runs {m.batch} rows of {m.n_in}; the manifest's int8_head says "
                                  f"{head.batch} of {head.n_in}, and the head runs 2")
            self.models[i] = m
        return self.models[i]

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """rows [n, in] float32 against the whole table: [n, vocab]."""
        return np.concatenate([self.model(i)(rows) for i in range(len(self.models))],
                              axis=1)[:, : self.head.vocab_size]


def open_int8_tiles(head: Int8Head, open_all: bool = False) -> tuple[Int8Tiles | None, str | None]:
    """(the tiles, None), or (None, why) when this interpreter cannot run them: the cpu head
    then computes the same logits in numpy, slower, and the command says so. `open_all`
    opens every tile now (`runner check`: a broken one is found there), not on first use."""
    try:
        return Int8Tiles(head, open_all), None
    except InterpreterTooOld as e:
        return None, f"the cpu LM head runs in numpy, slower: {e}"


class CpuHead:
    mode = "cpu"

    def __init__(self, table: Int8Table, tiles: Int8Tiles | None = None, note: str | None = None):
        self.table, self.tiles, self.stats = table, tiles, HeadStats()
        self.note = note  # why the head runs in numpy where the bundle has int8 tiles
        self._longest = None

    def _longest_row(self) -> float:
        """The table's longest row (`Int8Table.norms`), found on the first call that needs it."""
        if self._longest is None:
            self._longest = float(self.table.norms.max())
        return self._longest

    def __call__(self, h: np.ndarray, margin: float | None = None) -> np.ndarray:
        """Logits of h. `margin` 0 (greedy): the best one is the two parts' value, the rest
        fall short of theirs by less than the bound (module docstring); None or above 0:
        every logit is."""
        return self.rows(np.asarray(h, np.float32)[None], [margin])[0]

    def rows(self, h: np.ndarray, margins: list[float | None]) -> list[np.ndarray]:
        """The logits of each row of h [n, hidden] at its margin, those `self(h[i], margins[i])`
        gives, all from one call over the table: the first parts of every row and the second
        parts of the rows that need every logit. The serve engine's sequences decoding
        together read the table once per step, not once each. (The kernel quantizes each
        row alone, so a row's values do not depend on the others.)"""
        if self.tiles is None:
            return [self.table.logits(x) for x in h]
        first, second, _, rest_codes = two_parts(h)
        full = [i for i, m in enumerate(margins) if m is None or m > 0]
        out = self.tiles(np.concatenate([first, second[full]]))
        both = dict(zip(full, out[len(h):]))
        return [out[i] + both[i] if i in both else
                self._add_second_part(out[i], second[i : i + 1], row_part(rest_codes, i)) for i in range(len(h))]

    def _add_second_part(self, logits: np.ndarray, rest: np.ndarray, second) -> np.ndarray:
        """The first part's logits with the second part added to every token that could be the
        best (module docstring): greedy decoding's logits."""
        s, zp, codes = second
        length = np.float32(np.linalg.norm(s * (codes - zp).astype(np.float64)))
        top = logits.max()
        rounding = np.float32(1e-5) * max(top, -logits.min())  # float rounding in both computations
        # No token's bound exceeds the longest row's (float rounding is monotone), so only
        # tokens within twice that of the best first part can be the best: their bounds are
        # computed, not the whole table's.
        # (The slack covers the rounding of this test; a wider set gives the same candidates.)
        widest = np.float32(self._longest_row() * length) + rounding
        reach = 2 * widest
        near = logits >= top - reach - 1e-4 * (abs(top) + reach) - 1e-6
        # most of the table (a flat distribution): whole arrays beat gathers
        near = None if np.count_nonzero(near) > CANDIDATE_LIMIT else np.flatnonzero(near)
        norms, near_logits = (self.table.norms, logits) if near is None else (self.table.norms[near], logits[near])
        bound = norms * length
        bound += rounding
        floor = (near_logits - bound).max()  # the best token's logit is above this
        hit = near_logits + bound >= floor
        candidates = np.flatnonzero(hit) if near is None else near[hit]
        if len(candidates) > CANDIDATE_LIMIT:  # a flat distribution: the second part over the whole table
            logits += self.tiles(rest)[0]
            self.stats.rescored += len(logits)
            return logits
        logits[candidates] += self.table.second_part(second, candidates)
        self.stats.rescored += len(candidates)
        return logits


class FloatHead:
    """The float tied head of a checkpoint, computed in chunks of rows."""
    mode = "fp32"

    def __init__(self, checkpoint, vocab_size: int):
        self.checkpoint, self.vocab_size, self.stats = checkpoint, vocab_size, HeadStats()

    def __call__(self, h: np.ndarray, margin: float | None = None) -> np.ndarray:  # every logit, whatever the margin
        return np.concatenate([self.checkpoint.rows(f"{EMBEDDING}.weight", a, a + CHUNK_ROWS) @ h
                               for a in range(0, self.vocab_size, CHUNK_ROWS)])


class TileHead:
    """The head as TPU tiles (`tpu-preload` or `tpu-lazy`), with optional shortlist and rescore."""

    def __init__(self, bundle: Bundle, backend: str, mode: str, capacity: int | None = None,
                 shortlist: int | None = None, rescore: int | None = None, table: Int8Table | None = None,
                 delegates=None):
        head = bundle.lm_head
        if head is None:
            raise HeadError(f"{bundle.dir}: the bundle has no LM-head tiles; use --lm-head cpu")
        check_flavor(bundle, head.tiles, backend)
        n = len(head.tiles)
        if mode == "tpu-preload":
            capacity = n
        elif capacity is None:
            capacity = DEFAULT_CAPACITY
        elif capacity < 1:
            raise HeadError(f"--lm-cache-capacity must be at least 1 for tpu-lazy (the head has {n} tiles)")
        if shortlist is not None and not 1 <= shortlist <= n:
            raise HeadError(f"--shortlist must be from 1 to {n} (the head's tiles)")
        if rescore is not None and not 1 <= rescore <= head.vocab_size:
            raise HeadError(f"--rescore must be from 1 to {head.vocab_size} (the vocabulary)")
        if rescore is not None and table is None:
            raise HeadError("--rescore needs the int8 table of the bundle")
        self.mode, self.bundle, self.head, self.backend, self.delegates = mode, bundle, head, backend, delegates
        self.capacity, self.shortlist, self.rescore, self.table = min(capacity, n), shortlist, rescore, table
        self.open: OrderedDict[int, object] = OrderedDict()  # tile index -> its QuantizedLinear, LRU order
        self.best = np.full(n, np.inf, np.float32)  # each tile's best logit when it last ran
        self.stats = HeadStats()
        if mode == "tpu-preload":
            for i in range(n):
                self.open[i] = self._load(i)

    def _load(self, i: int):
        layer = quantized_layer(self.bundle, self.head.tiles[i], self.backend, self.delegates)
        layer.backend.load()  # decoded or opened now: the tile is about to run, or preloaded on purpose
        return layer

    def tile(self, i: int):
        """Tile i, from the LRU or opened (closing the least recently used one when full)."""
        if i in self.open:
            self.stats.hits += 1
            self.open.move_to_end(i)
            return self.open[i]
        self.stats.misses += 1
        if len(self.open) >= self.capacity:
            self.open.popitem(last=False)
            self.stats.evictions += 1
        self.open[i] = self._load(i)
        return self.open[i]

    def tiles_to_run(self) -> list[int]:
        """This step's tiles, those already open first: the logits do not depend on the order,
        and a plain 0..n-1 sweep through an LRU smaller than the head would miss every time."""
        n = len(self.head.tiles)
        if self.shortlist is None or np.isinf(self.best).any():
            chosen = set(range(n))
        else:
            chosen = set(np.argsort(-self.best, kind="stable")[: self.shortlist].tolist())
        open_first = [i for i in self.open if i in chosen]
        return open_first + sorted(chosen.difference(open_first))

    def __call__(self, h: np.ndarray, margin: float | None = None) -> np.ndarray:  # its options decide, not the margin
        rows, vocab = self.head.tile_rows, self.head.vocab_size
        logits = np.full(vocab, -np.inf, np.float32)
        x = np.asarray(h, np.float32)[None]
        for i in self.tiles_to_run():
            y = self.tile(i)(x)[0]
            a, b = i * rows, min((i + 1) * rows, vocab)
            logits[a:b] = y[: b - a]  # the padding rows past the vocabulary are dropped
            self.best[i] = y[: b - a].max()
            self.stats.tiles += 1
        if self.rescore is None:
            return logits
        k = min(self.rescore, int(np.isfinite(logits).sum()))
        candidates = np.argpartition(-logits, k - 1)[:k]
        out = np.full(vocab, -np.inf, np.float32)
        out[candidates] = self.table.logits(h, candidates)
        self.stats.rescored += k
        return out


def make_head(bundle: Bundle, backend: str, mode: str, capacity: int | None = None, shortlist: int | None = None,
              rescore: int | None = None, delegates=None):
    """The head `mode` names, on `backend` (not fp32), and the int8 table the input embedding uses."""
    table = Int8Table(bundle.host)
    if mode not in HEAD_MODES:
        raise HeadError(f"--lm-head {mode!r} is not one of {', '.join(HEAD_MODES)}")
    if mode == "cpu":
        if shortlist is not None or rescore is not None or capacity is not None:
            raise HeadError("--shortlist, --rescore and --lm-cache-capacity are for the TPU heads "
                            "(tpu-preload, tpu-lazy); the cpu head computes every logit exactly")
        if bundle.int8_head is None or backend == "emulate":
            return CpuHead(table), table
        return CpuHead(table, *open_int8_tiles(bundle.int8_head)), table
    if mode == "tpu-preload" and capacity is not None:
        raise HeadError("--lm-cache-capacity is for --lm-head tpu-lazy (tpu-preload keeps every tile)")
    return TileHead(bundle, backend, mode, capacity, shortlist, rescore, table, delegates), table
