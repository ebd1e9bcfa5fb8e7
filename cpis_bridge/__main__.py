"""Entry point for ``python -m cpis_bridge``: delegates to the CLI."""

from cpis_bridge.cli import main

raise SystemExit(main())
