"""python -m repfuse: the same command line as `repfuse`."""

from repfuse.backends.cli import main

raise SystemExit(main())
