r"""`python -m hfprune ...` runs the `hfprune` command (also under `torchrun` and `accelerate launch -m`)."""

from .cli import main


if __name__ == "__main__":
    main()
