"""`python -m distill_app`: the `distill` command, for environments without the console script."""

from .cli import main

if __name__ == "__main__":
    main()
