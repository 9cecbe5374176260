"""`python -m professional_nano_llm ...` is the `pnl` command."""

import sys

from professional_nano_llm.cli import main

sys.exit(main())
