"""`python -m lmforge ...` runs the `lmforge` command."""

from lmforge.cli import main

raise SystemExit(main())
