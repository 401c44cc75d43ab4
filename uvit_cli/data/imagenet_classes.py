"""The 1000 ImageNet class names in the standard label order (as torchvision lists them), and name lookup.

The names ship as ``uvit_cli/assets/imagenet_classes.txt`` (one per line, line i = class id i).
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

from ..errors import UvitError

ASSET = Path(__file__).resolve().parent.parent / "assets" / "imagenet_classes.txt"


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 names; index = class id (0 tench ... 207 golden retriever ... 999 toilet tissue)."""
    names = tuple(line.strip() for line in ASSET.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(names) != 1000:
        raise UvitError(f"{ASSET} lists {len(names)} names instead of 1000; reinstall uvit")
    return names


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def imagenet_class_id(name: str) -> int:
    """The id of a class name (case, spaces, '-' and '_' do not matter); unknown names suggest close ones."""
    names = imagenet_class_names()
    table = {_norm(n): i for i, n in enumerate(names)}
    key = _norm(name)
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, list(table), n=4, cutoff=0.6)
    close += [n for n in table if key and key in n and n not in close][: max(0, 4 - len(close))]
    hint = ("; did you mean " + ", ".join(f"{names[table[c]]!r} ({table[c]})" for c in close) + "?") if close else \
        "; pass a class id 0-999 or a name such as 'golden retriever'"
    raise UvitError(f"unknown ImageNet class {name!r}{hint}")
