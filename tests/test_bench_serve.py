"""bench/serve.py's bookkeeping of /metrics across rounds: each round starts its servers
afresh, so what the load loops formed is each round's growth, summed."""

from __future__ import annotations

from bench.serve import add_metrics, batch_rows, metrics_since

BUCKETS = (1.0, 2.0, 4.0, 8.0, float("inf"))


def reading(rows: list[int], queue: float) -> dict:
    """What `metrics_text` reads from a server that ran forward passes of these rows: the
    rows-per-pass histogram (cumulative buckets), its count and sum, and a gauge."""
    out = {}
    for bound in BUCKETS:
        le = "+Inf" if bound == float("inf") else str(bound)
        out[f'runner_batch_rows_bucket{{kind="chat",le="{le}",model="m"}}'] = float(sum(r <= bound for r in rows))
    out['runner_batch_rows_count{kind="chat",model="m"}'] = float(len(rows))
    out['runner_batch_rows_sum{kind="chat",model="m"}'] = float(sum(rows))
    out['runner_queue_depth{model="m"}'] = queue
    return out


def test_rounds_add_up_to_the_passes_of_every_round():
    warm_up, first, second = [1, 8], [1, 1, 3, 4, 16], [2, 2, 7]
    round_1 = metrics_since(reading(warm_up, 0), reading(warm_up + first, 3))
    round_2 = metrics_since(reading(warm_up, 0), reading(warm_up + second, 1))  # a new server: counts from zero
    total = add_metrics(add_metrics({}, round_1), round_2)

    expected: dict[int, int] = {}
    for r in first + second:
        bound = next(int(b) if b != float("inf") else None for b in BUCKETS if r <= b)
        if bound is not None:
            expected[bound] = expected.get(bound, 0) + 1
    assert batch_rows(total) == expected  # {1: 2, 2: 2, 4: 2, 8: 1}; 16 rows fall past the last bound
    assert total['runner_batch_rows_count{kind="chat",model="m"}'] == len(first + second)
    assert total['runner_batch_rows_sum{kind="chat",model="m"}'] == sum(first + second)
    assert total['runner_queue_depth{model="m"}'] == 1  # a gauge: the later reading
