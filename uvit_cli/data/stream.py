"""The training stream: sample g of an endless, seeded stream of examples with all of their randomness.

Every random choice a training example needs (which image, its flip, which caption, the diffusion time u, the
noise, the label drop for guidance, the latent draw from the VAE moments) is a function of (seed, g) alone. So:
- exact resume needs only the step: the stream restarts at position step * global_batch;
- N ranks with batch b each see exactly what 1 rank with batch N*b sees (world-size invariant training);
- data-loader workers and prefetching never change the result.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads (seed, index) pairs over generator seeds


def _seed(seed: int, index: int, salt: int = 0) -> int:
    return (seed * _MIX + index * 2654435761 + salt * 40503 + 1) % (2 ** 63 - 1)


def _generator(seed: int, index: int, salt: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_seed(seed, index, salt))
    return g


class TrainStream(Dataset):
    """Wraps a source (``len``, ``get(i, flip) -> (x, y)``) and returns, for stream position g, a dict with
    x0 (image in [-1, 1] or a sampled, scaled latent), y (label, text context or -1), u (uniform time draw),
    noise (like x0) and drop (replace the condition by the null one). ``__getitems__`` reads a whole batch at once
    (what the DataLoader calls) with the same draws, per position, as ``__getitem__``."""

    def __init__(self, source, seed: int, *, random_flip: bool = False, p_uncond: float = 0.0,
                 latent_scale: float | None = None, num_captions: int = 0):
        self.source, self.seed = source, seed
        self.random_flip, self.p_uncond = random_flip, p_uncond
        self.latent_scale, self.num_captions = latent_scale, num_captions
        self._perm_epoch, self._perm = -1, None

    def __len__(self):  # endless stream; the batch sampler decides how far to read
        return 2 ** 62

    def _index(self, g: int) -> int:
        n = len(self.source)
        epoch = g // n
        if epoch != self._perm_epoch:  # a fresh permutation per epoch, the same on every rank and worker
            self._perm = torch.randperm(n, generator=_generator(self.seed, epoch, salt=1)).tolist()
            self._perm_epoch = epoch
        return self._perm[g % n]

    def _example(self, g: int, gen: torch.Generator):
        """Position g's (x0, y, noise, uniforms (flip, u, drop)). Per position, in this fixed order, the generator
        seeded by (seed, g) draws: flip, the caption (text sources), u, drop, the latent (latent sources), noise."""
        i = self._index(g)
        gen.manual_seed(_seed(self.seed, g, salt=2))
        caption = None
        if self.num_captions:
            first = torch.rand(1, generator=gen)   # flip's uniform comes before the caption draw
            caption = int(torch.randint(self.num_captions, (), generator=gen))
            uniforms = torch.cat([first, torch.rand(2, generator=gen)])
        else:   # the three uniforms in one call: the CPU generator fills a tensor in order, as three calls would
            uniforms = torch.rand(3, generator=gen)
        flip = self.random_flip and bool(uniforms[0] < 0.5)
        x, y = self.source.get(i, flip=flip) if caption is None else self.source.get(i, flip=flip, caption=caption)
        x = x.float()
        if self.latent_scale is not None:  # x holds VAE moments (mean ‖ logvar): draw z, then scale it
            mean, logvar = x.chunk(2, dim=0)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            x = (mean + std * torch.randn(mean.shape, generator=gen)) * self.latent_scale
        return x, y, torch.randn(x.shape, generator=gen), uniforms

    def _items(self, examples) -> list[dict]:
        xs, ys, noises, uniforms = zip(*examples)
        uniforms = torch.stack(uniforms)
        if not isinstance(ys[0], torch.Tensor):   # class labels (or None: unconditional) as one int64 tensor each
            ys = torch.tensor([-1 if y is None else int(y) for y in ys], dtype=torch.long).unbind()
        drops = (uniforms[:, 2] < self.p_uncond).unbind()
        return [{"x0": x, "y": y, "u": u, "noise": noise, "drop": drop}
                for x, y, u, noise, drop in zip(xs, ys, uniforms[:, 1].unbind(), noises, drops)]

    def __getitem__(self, g: int) -> dict:
        return self._items([self._example(g, torch.Generator())])[0]

    def __getitems__(self, gs: list[int]) -> list[dict]:
        gen = torch.Generator()   # one generator, reseeded per position: a fresh one per example costs as much
        return self._items([self._example(g, gen) for g in gs])


class StreamBatches(Sampler):
    """This rank's micro-batches of stream positions from ``start_step`` on: step s covers positions
    [s*B, (s+1)*B) of the stream, split evenly over ranks and then over accumulation micro-batches."""

    def __init__(self, global_batch: int, world: int, rank: int, accum: int, start_step: int, end_step: int):
        self.B, self.world, self.rank, self.accum = global_batch, world, rank, accum
        self.start, self.end = start_step, end_step
        self.per_rank = global_batch // world
        self.micro = self.per_rank // accum

    def __len__(self):
        return max(0, self.end - self.start) * self.accum

    def __iter__(self):
        for s in range(self.start, self.end):
            base = s * self.B + self.rank * self.per_rank
            for a in range(self.accum):
                lo = base + a * self.micro
                yield list(range(lo, lo + self.micro))
