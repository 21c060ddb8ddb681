"""`python -m retrolm ...` (what torchrun launches) is the same app as the `retrolm` script."""

from retrolm.cli import main

if __name__ == "__main__":
    main()
