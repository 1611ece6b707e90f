"""`python -m chattune ...`: the same command as the `chattune` script."""

import sys

from chattune.cli import main

if __name__ == "__main__":
    sys.exit(main())
