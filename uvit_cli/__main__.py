"""`python -m uvit_cli ...` (what torchrun launches) is the `uvit` command."""

from .cli import main

if __name__ == "__main__":
    main()
