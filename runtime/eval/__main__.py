"""`python -m runtime.eval`: rolling perplexity and the comparison of two exports (perplexity.py)."""

from runtime.eval.perplexity import main

raise SystemExit(main())
