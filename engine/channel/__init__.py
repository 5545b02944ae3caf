"""The shared-memory channel between the server and its worker processes."""
