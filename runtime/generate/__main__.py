"""`python -m runtime.generate`: the command line (cli.py)."""

from runtime.generate.cli import main

raise SystemExit(main())
