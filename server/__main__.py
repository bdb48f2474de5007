"""`python -m server ...` is the same as the `sdflow` command."""
from .cli import main

raise SystemExit(main())
