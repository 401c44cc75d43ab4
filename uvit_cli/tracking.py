"""Experiment trackers: where a training run's metrics, sample grids and recipe go (``train.log_to``).

``metrics.jsonl`` in the run directory is always written; TensorBoard and Weights & Biases are optional extras
(``pip install "uvit[tensorboard]"`` / ``"uvit[wandb]"``). The training loop talks to :class:`Trackers` alone, on
rank 0 only: ``log(record)`` after each logged step (numbers become scalars, e.g. loss, lr, grad_norm, img_per_s,
peak_mem_gb and the labelled ``monitor/...`` metric; a protocol card becomes text), ``image(step, tag, path)``
for each EMA sample grid, ``close()`` at the end. The resolved recipe is each tracker's run config.

wandb honours its own environment (``WANDB_MODE=offline`` logs to files without a network, ``WANDB_ENTITY``...);
the run id is kept in the run directory, so a resumed training run resumes the same wandb run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import numbers
import secrets
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UvitError
from .files import write_text
from .recipe import Recipe, dump_recipe, recipe_to_dict
from .run import TENSORBOARD, WANDB_ID, MetricsLog

log = logging.getLogger(__name__)

# tracker (recipe.Tracker) -> (the module it needs, the pip extra that installs it); jsonl needs nothing
TRACKERS: dict[str, tuple[str, str] | None] = {
    "jsonl": None,
    "tensorboard": ("tensorboard", "uvit[tensorboard]"),
    "wandb": ("wandb", "uvit[wandb]"),
}


def check_trackers(names) -> None:
    """A tracker whose package is missing is a UvitError naming the extra to install, before training starts."""
    for name in names:
        need = TRACKERS[name]
        if need is not None and importlib.util.find_spec(need[0]) is None:
            raise UvitError(f"train.log_to has {name} but the {need[0]} package is not installed; "
                            f"pip install \"{need[1]}\" (or drop {name} from train.log_to)")


def _scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record (without its step and wall-clock time)."""
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _texts(record: dict) -> dict[str, str]:
    """The structured values of a record (protocol cards) as JSON text."""
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in record.items() if isinstance(v, (dict, list))}


def read_image(path: str | Path) -> np.ndarray:
    """A saved grid as uint8 (H, W, 3): what the trackers show is the PNG in ``samples/``."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


class TensorBoardTracker:
    """Event files in ``RUN/tensorboard``; a resumed run purges the events past its checkpoint's step."""

    def __init__(self, run_dir: Path, recipe: Recipe, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter  # deferred: the optional tensorboard extra

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=resume_step + 1 if resume_step else None)
        self.writer.add_text("recipe", "```yaml\n" + dump_recipe(recipe) + "```", global_step=resume_step)

    def log(self, step: int, scalars: dict, texts: dict) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, global_step=step)
        for k, v in texts.items():
            self.writer.add_text(k, v, global_step=step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run whose id lives in ``RUN/wandb_id.txt``: resuming training resumes that run (resume="allow")."""

    def __init__(self, run_dir: Path, recipe: Recipe, resume_step: int):
        import wandb  # deferred: the optional wandb extra

        self.wandb = wandb
        id_file = run_dir / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(4)
            write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=recipe.train.wandb_project, id=run_id, resume="allow", name=run_dir.name,
                              dir=str(run_dir), config=recipe_to_dict(recipe))
        self.id = run_id

    def log(self, step: int, scalars: dict, texts: dict) -> None:
        self.run.log(scalars, step=step)
        for k, v in texts.items():
            self.run.summary[k] = v

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


class Trackers:
    """Every tracker of a run behind one interface; ``metrics.jsonl`` is always among them."""

    def __init__(self, run_dir: Path, recipe: Recipe, resume_step: int = 0):
        check_trackers(recipe.train.log_to)
        self.metrics = MetricsLog(run_dir, resume_step=resume_step)
        self.others = []
        try:
            for name in dict.fromkeys(recipe.train.log_to):  # in order, once each
                if name != "jsonl":
                    self.others.append(OPENERS[name](Path(run_dir), recipe, resume_step))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict) -> None:
        """One metrics record (it has a "step"): to metrics.jsonl as it is, and its numbers to every tracker."""
        self.metrics.write(record)
        scalars, texts = _scalars(record), _texts(record)
        for t in self.others:
            t.log(int(record["step"]), scalars, texts)

    def image(self, step: int, tag: str, path: str | Path) -> None:
        """A saved image (the EMA sample grid) to every tracker that shows images."""
        if self.others:
            image = read_image(path)
            for t in self.others:
                t.image(step, tag, image)

    def close(self) -> None:
        for t in self.others:
            try:
                t.close()
            except Exception as e:  # noqa: BLE001 - a tracker failing to flush must not hide the run's own error
                log.warning("closing %s failed: %s", type(t).__name__, e)
        self.others = []
