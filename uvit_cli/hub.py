"""External weights on the Hugging Face hub: cache-only by default, downloads only when the user allows them.

Nothing downloads silently: a hub file is looked up in the local cache unless ``--allow-download`` (or
``UVIT_ALLOW_DOWNLOAD=1``) says otherwise, and a missing file is a :class:`UvitError` naming the fix.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from .errors import UvitError

log = logging.getLogger(__name__)

ALLOW_ENV = "UVIT_ALLOW_DOWNLOAD"


def downloads_allowed(explicit: bool | None = None) -> bool:
    """An explicit flag wins; otherwise ``UVIT_ALLOW_DOWNLOAD=1`` (or true/yes) allows hub downloads."""
    if explicit is not None:
        return bool(explicit)
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@contextmanager
def offline_unless(allowed: bool):
    """Hub offline mode for the duration (unless downloads are allowed): nothing touches the network, and a missing
    file fails at once instead of after the hub client's retries (about 25 s without a network)."""
    if allowed:
        yield
        return
    targets = [constants] + [sys.modules[m] for m in ("datasets.config",) if m in sys.modules]
    saved = [getattr(t, "HF_HUB_OFFLINE", None) for t in targets]
    for t in targets:
        t.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for t, v in zip(targets, saved):
            t.HF_HUB_OFFLINE = v


def hub_cache_dir() -> str:
    return str(constants.HF_HUB_CACHE)


def hub_file(repo_id: str, filename: str, *, subfolder: str | None = None, allow_download: bool = False,
             what: str = "weights", local_hint: str = "") -> Path:
    """Path of ``filename`` in hub repo ``repo_id`` from the local cache (or downloaded when allowed).

    Raises FileNotFoundError when the repo is reachable but lacks the file (callers try alternatives), and
    UvitError when the file is not cached and downloads are off (or the download fails).
    """
    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder or None,
                                    local_files_only=not allow_download))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(filename) from None
    except EntryNotFoundError:
        raise FileNotFoundError(filename) from None
    except Exception as e:  # noqa: BLE001 - network, auth, gated repos: all mean "not available"
        raise UvitError(f"could not download {what} {repo_id!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        f"{local_hint or 'pass a local path instead'}") from None


def missing_message(spec: str, what: str, local_hint: str) -> str:
    """The one-line error for hub weights that are not in the local cache."""
    return (f"{what} {spec!r} is not in the local Hugging Face cache ({hub_cache_dir()}); {local_hint}, "
            f"or allow the download with --allow-download (or {ALLOW_ENV}=1)")


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False,
                api=None) -> list[str]:
    """Upload a folder (an export) to a Hub model repo, creating the repo if needed; returns the files sent.

    ``dry_run`` lists them and contacts nothing. The token is huggingface_hub's own (``HF_TOKEN`` or
    ``huggingface-cli login``); ``api`` stands in for ``HfApi()`` in tests."""
    folder = Path(folder)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UvitError(f"--push-to-hub {repo_id!r}: a Hub repo id is OWNER/NAME, e.g. my-name/uvit-h2-imagenet256")
    if dry_run:
        return files
    api = HfApi() if api is None else api
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="uvit export")
    except Exception as e:  # noqa: BLE001 - network, auth, permissions: all mean "not pushed"
        raise UvitError(f"could not push {folder} to {repo_id} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); log in with `huggingface-cli login` or set "
                        "HF_TOKEN, and check the repo name") from None
    log.info("pushed %d files to https://huggingface.co/%s", len(files), repo_id)
    return files
