"""`python -m runtime.serve`: the OpenAI-compatible server (app.py)."""

from runtime.serve.app import main

raise SystemExit(main())
