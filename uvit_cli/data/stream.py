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


def _generator(seed: int, index: int, salt: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * _MIX + index * 2654435761 + salt * 40503 + 1) % (2 ** 63 - 1))
    return g


class TrainStream(Dataset):
    """Wraps a source (``len``, ``get(i, flip) -> (x, y)``) and returns, for stream position g, a dict with
    x0 (image in [-1, 1] or a sampled, scaled latent), y (label, text context or -1), u (uniform time draw),
    noise (like x0) and drop (replace the condition by the null one)."""

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
            self._perm = torch.randperm(n, generator=_generator(self.seed, epoch, salt=1))
            self._perm_epoch = epoch
        return int(self._perm[g % n])

    def __getitem__(self, g: int) -> dict:
        i = self._index(g)
        gen = _generator(self.seed, g, salt=2)
        flip = bool(torch.rand((), generator=gen) < 0.5) and self.random_flip
        caption = int(torch.randint(self.num_captions, (), generator=gen)) if self.num_captions else None
        u = torch.rand((), generator=gen)
        drop = bool(torch.rand((), generator=gen) < self.p_uncond)
        x, y = self.source.get(i, flip=flip) if caption is None else self.source.get(i, flip=flip, caption=caption)
        x = x.float()
        if self.latent_scale is not None:  # x holds VAE moments (mean ‖ logvar): draw z, then scale it
            mean, logvar = x.chunk(2, dim=0)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            x = (mean + std * torch.randn(mean.shape, generator=gen)) * self.latent_scale
        noise = torch.randn(x.shape, generator=gen)
        if not isinstance(y, torch.Tensor):
            y = torch.tensor(-1 if y is None else int(y), dtype=torch.long)
        return {"x0": x, "y": y, "u": u, "noise": noise, "drop": torch.tensor(drop)}


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
