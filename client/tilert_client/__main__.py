"""`python -m tilert_client` runs the CLI, for environments without the console script."""

from tilert_client.cli import main

main()
