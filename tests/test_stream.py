"""The seeded training stream: every example is a function of (seed, position), so ranks and resumes agree."""

from __future__ import annotations

import torch

from uvit_cli.data.pixels import DigitsSource
from uvit_cli.data.stream import StreamBatches, TrainStream


def _stream(seed=3, **kw):
    return TrainStream(DigitsSource(), seed, random_flip=True, p_uncond=0.3, **kw)


def _positions(global_batch, world, accum, start, end):
    return [[g for micro in StreamBatches(global_batch, world, r, accum, start, end) for g in micro]
            for r in range(world)]


def test_two_ranks_cover_exactly_what_one_rank_sees():
    one = _positions(8, 1, 1, 0, 5)[0]
    two = _positions(8, 2, 1, 0, 5)
    assert sorted(two[0] + two[1]) == one == list(range(40))
    assert not set(two[0]) & set(two[1])
    # with accumulation the rank's micro-batches still tile its share of each step
    acc = _positions(8, 2, 2, 0, 5)
    assert acc == two


def test_resume_starts_at_the_step_position():
    full = _positions(6, 1, 1, 0, 10)[0]
    resumed = _positions(6, 1, 1, 4, 10)[0]
    assert resumed == full[4 * 6:] and len(StreamBatches(6, 1, 0, 1, 4, 10)) == 6


def test_an_example_depends_on_its_position_only():
    a, b = _stream(), _stream()
    for g in (0, 17, 1796, 1797, 5000):   # across the epoch boundary too
        x, y = a[g], b[g]
        assert all(torch.equal(x[k], y[k]) for k in x)
    # reading in another order (another rank, another worker) does not change an example
    late = _stream()
    late[4000]
    assert torch.equal(late[17]["noise"], a[17]["noise"]) and torch.equal(late[17]["x0"], a[17]["x0"])
    assert not torch.equal(a[0]["noise"], a[1]["noise"])
    assert not torch.equal(_stream(seed=4)[0]["noise"], a[0]["noise"])


def test_every_image_once_per_epoch_and_a_new_order_each_epoch():
    s = TrainStream(DigitsSource(), 0)
    n = len(s.source)
    first = [s._index(g) for g in range(n)]
    second = [s._index(g) for g in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n)) and first != second


def test_flips_drops_and_draws_follow_their_probabilities():
    s = _stream()
    items = [s[g] for g in range(2000)]
    drop = sum(bool(i["drop"]) for i in items) / len(items)
    u = torch.stack([i["u"] for i in items])
    assert 0.25 < drop < 0.35 and 0.45 < float(u.mean()) < 0.55
    flipped = sum(not torch.equal(i["x0"], s.source.get(s._index(g))[0]) for g, i in enumerate(items[:400]))
    assert 120 < flipped < 280            # about half (a symmetric digit looks the same flipped)
    assert {int(i["y"]) for i in items} == set(range(10))
