"""`python -m shared.bench`: `twindiff bench` without the launcher."""

import sys

from shared.bench import main

if __name__ == "__main__":
    sys.exit(main())
