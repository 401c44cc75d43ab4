"""`python -m uvit_cli.cli.torchrun ARGS`: torchrun (torch.distributed.run, same arguments) for `--nproc-per-node`,
without torchrun's own report of a failed rank (its traceback and agent warnings): the ranks record their errors
for the launcher (cli/options.py: relaunch), which prints rank 0's message once."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..files import write_json
from .options import EXITS, RANK_ERRORS_ENV


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # torchrun's argparse reads the command's own options too (`--n 4` is an "ambiguous option" to it): it parses
    # only its options and the module; the command's arguments are handed on untouched.
    i = argv.index("-m") + 2
    args = parse_args(argv[:i])
    args.training_script_args = argv[i:]
    try:
        run(args)
    except ChildFailedError as e:
        codes = {int(rank): f.exitcode for rank, f in e.failures.items()}
        if os.environ.get(RANK_ERRORS_ENV):   # how each failed rank ended, for the launcher's one message
            write_json(Path(os.environ[RANK_ERRORS_ENV]) / EXITS, codes)
        return next((c for _, c in sorted(codes.items()) if c > 0), 1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
