"""tilert.engine: model descriptions, loaders, tokenizer, sampling, executors,
worker processes and the shared-memory channel between them and the server."""
