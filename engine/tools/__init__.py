"""Command-line tools of the engine (registered on the `tilert` command)."""
