"""``python -m dlkunet ...`` (and ``torchrun -m dlkunet train ...``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
