r"""`python -m hfprune ...` runs the `hfprune` command (also under `torchrun` and `accelerate launch -m`)."""

import sys

from .commands import main


if __name__ == "__main__":
    sys.exit(main())
