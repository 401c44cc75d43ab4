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


def _reference_example(stream, g):
    """The stream's per-position draws as first written, one scalar draw at a time: every later implementation
    must give exactly these values (runs resume across versions, and recorded results depend on them)."""
    gen = torch.Generator()
    gen.manual_seed((stream.seed * 0x9E3779B97F4A7C15 + g * 2654435761 + 2 * 40503 + 1) % (2 ** 63 - 1))
    n = len(stream.source)
    perm = torch.Generator()
    perm.manual_seed((stream.seed * 0x9E3779B97F4A7C15 + (g // n) * 2654435761 + 40503 + 1) % (2 ** 63 - 1))
    i = int(torch.randperm(n, generator=perm)[g % n])
    flip = bool(torch.rand((), generator=gen) < 0.5) and stream.random_flip
    caption = int(torch.randint(stream.num_captions, (), generator=gen)) if stream.num_captions else None
    u = torch.rand((), generator=gen)
    drop = bool(torch.rand((), generator=gen) < stream.p_uncond)
    x, y = stream.source.get(i, flip=flip) if caption is None else stream.source.get(i, flip=flip, caption=caption)
    x = x.float()
    if stream.latent_scale is not None:
        mean, logvar = x.chunk(2, dim=0)
        x = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape, generator=gen)) \
            * stream.latent_scale
    noise = torch.randn(x.shape, generator=gen)
    y = y if isinstance(y, torch.Tensor) else torch.tensor(-1 if y is None else int(y), dtype=torch.long)
    return {"x0": x, "y": y, "u": u, "noise": noise, "drop": torch.tensor(drop)}


class _Captioned:
    """A text source: image i flipped or not, caption k's context depends on (i, k)."""

    def __len__(self):
        return 50

    def get(self, i, flip=False, caption=None):
        x = torch.arange(16.0).reshape(1, 4, 4) + i
        return (x.flip(-1) if flip else x), torch.full((3, 2), 100.0 * i + caption)


class _Moments:
    """A latent source: moments (mean ‖ logvar) per item, labels with some unconditional (None) items."""

    def __len__(self):
        return 30

    def get(self, i, flip=False):
        return torch.linspace(-1, 1, 2 * 2 * 4 * 4).reshape(4, 4, 4) * (i + 1), (None if i % 7 == 0 else i % 5)


def test_batched_reads_give_exactly_the_draws_of_one_position_at_a_time():
    from torch.utils.data import DataLoader
    from torch.utils.data._utils.collate import default_collate

    streams = [_stream(),                                                        # digits: flips, label drops
               TrainStream(_Captioned(), 5, random_flip=True, p_uncond=0.2, num_captions=4),
               TrainStream(_Moments(), 6, p_uncond=0.1, latent_scale=0.18215)]
    for s in streams:
        n = len(s.source)
        positions = list(range(n - 20, n + 20))                                  # across an epoch boundary
        reference = [_reference_example(s, g) for g in positions]
        assert any(bool(r["drop"]) for r in reference) and any(not bool(r["drop"]) for r in reference)
        batch = s.__getitems__(positions)
        one = [s[g] for g in positions]
        for got in (batch, one):
            for a, b in zip(got, reference):
                assert a.keys() == b.keys()
                for k in a:
                    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
                    assert torch.equal(a[k], b[k]), k
        # the DataLoader reads a batch through __getitems__ and collates it as before
        loaded = next(iter(DataLoader(s, batch_sampler=[positions], num_workers=0)))
        expected = default_collate(reference)
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
