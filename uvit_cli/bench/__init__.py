"""`uvit bench`: throughput, MFU and memory, measured on this machine (one module per suite).

Every suite times with :func:`timer.measure` (warm-up, then the median of repeats) and reports rows with the same
keys: ``device``, ``precision``, ``img_per_s``, ``sec_per_step`` (seconds per unit of work: a training step, a
sampler step, an encoder or Inception batch), ``mfu`` (model FLOPs utilisation against the matmul peak measured in
the same run; None where it does not apply) and ``runs`` (every repeat).
"""
