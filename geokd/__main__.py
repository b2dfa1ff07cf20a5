"""`python -m geokd ...` (and `torchrun -m geokd ...`) runs the command-line interface."""

from geokd.cli import main

if __name__ == "__main__":
    main()
