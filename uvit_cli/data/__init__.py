"""Data: image sources, preprocessing, latent shards, and the built-in digits."""
