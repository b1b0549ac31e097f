"""Top-level entry of the resnetc command line: `python cli.py ...` == `resnetc ...`.

The click application and each command's single definition live in ``resnetc/cli/``.
"""
from resnetc.cli import main

if __name__ == "__main__":
    main()
