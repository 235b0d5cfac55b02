"""`python -m dqa_ext.robust COMMAND ...`: the `dqa` command (also under torchrun's -m)."""
import sys

from .cli import main

sys.exit(main())
