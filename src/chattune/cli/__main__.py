"""`python -m chattune.cli ...`, the spelling of earlier releases (and of scripts written for them): the same
command as `python -m chattune` and the `chattune` script."""

import sys

from chattune.cli import main

if __name__ == "__main__":
    sys.exit(main())
