"""`tilert-client`: generate, health, info and cancel from a terminal.

Exit codes: 0 success, 1 runtime or RPC error, 2 usage error, 130 interrupted.
Generated text (or, with --json, one JSON object per event) is the only thing
written to stdout; statistics and errors go to stderr, so output can be piped.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import click

from tilert_client._connection import (
    DEFAULT_TARGET,
    HEALTH_SERVICE_DEFAULT,
    TARGET_ENV,
)
from tilert_client._mapping import as_dict
from tilert_client._version import __version__
from tilert_client.client import Client, GenerateStream
from tilert_client.errors import TilertError
from tilert_client.events import Finished, Started, TokenChunk
from tilert_client.info import HealthStatus

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
_EVENT_NAMES = {Started: "started", TokenChunk: "chunk", Finished: "finished"}


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        # click turns Ctrl-C into "Aborted!" with exit 1; a shell script must be
        # able to tell an interrupt from a failure.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except TilertError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(EXIT_ERROR)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tilert-client")
def main() -> None:
    """Client for a tilert text-generation server."""


# ------------------------------------------------------------ connection


@dataclass(frozen=True)
class _Conn:
    target: str
    timeout: float | None
    token: str | None
    tls: bool
    ca_cert: str | None
    client_cert: str | None
    client_key: str | None

    def client(self) -> Client:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        try:
            return Client(
                self.target,
                timeout=self.timeout,
                tls=self.tls,
                root_certificates=read(self.ca_cert),
                private_key=read(self.client_key),
                certificate_chain=read(self.client_cert),
                token=self.token,
            )
        except ValueError as err:
            raise click.UsageError(str(err)) from err


def _connection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the connection flags to a command and passes them as one `conn`."""
    cert = click.Path(exists=True, dir_okay=False)
    options = [
        click.option(
            "--target",
            envvar=TARGET_ENV,
            default=DEFAULT_TARGET,
            show_default=True,
            help=f"host:port or unix:/path (env {TARGET_ENV}).",
        ),
        click.option("--timeout", type=float, help="Deadline of the call in seconds."),
        click.option("--token", envvar="TILERT_TOKEN", help="Bearer token (env TILERT_TOKEN)."),
        click.option("--tls", is_flag=True, help="Use TLS (implied by the certificate options)."),
        click.option("--ca-cert", type=cert, help="PEM roots to verify the server with."),
        click.option("--client-cert", type=cert, help="PEM client certificate (mutual TLS)."),
        click.option("--client-key", type=cert, help="PEM client private key (mutual TLS)."),
    ]

    @functools.wraps(fn)
    def wrapper(
        target: str,
        timeout: float | None,
        token: str | None,
        tls: bool,
        ca_cert: str | None,
        client_cert: str | None,
        client_key: str | None,
        **kwargs: Any,
    ) -> Any:
        conn = _Conn(target, timeout, token, tls, ca_cert, client_cert, client_key)
        return fn(conn=conn, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


# -------------------------------------------------------------- generate


def _stdin_is_tty() -> bool:
    return sys.stdin is None or sys.stdin.isatty()


def _read_prompt(prompt: str | None) -> str:
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and _stdin_is_tty():
        raise click.UsageError("give a PROMPT, or pipe one on stdin")
    text = sys.stdin.read()
    if not text.strip():
        raise click.UsageError("the prompt on stdin is empty")
    # `echo "question" | tilert-client generate` should not send the newline
    # that echo appended; any other whitespace is the user's.
    return text[:-1] if text.endswith("\n") else text


def _stats_line(started: Started | None, finished: Finished) -> str:
    parts = [
        f"finish: {finished.reason}",
        f"prompt {finished.usage.prompt_tokens or (started.prompt_tokens if started else 0)} tok",
        f"completion {finished.usage.completion_tokens} tok",
        f"TTFT {finished.timing.ttft_ms:.1f} ms",
        f"{finished.timing.ms_per_token:.2f} ms/token",
    ]
    if finished.matched_stop is not None:
        parts.insert(1, f"stop: {finished.matched_stop!r}")
    return "[" + " | ".join(parts) + "]"


def _print_events(stream: GenerateStream, out: TextIO, as_json: bool, quiet: bool) -> None:
    started: Started | None = None
    open_line = False  # text was printed and the last chunk did not end a line

    def end_line() -> None:
        # Only a terminal gets a closing newline (before stats or an error
        # message that share the screen); piped output stays byte-exact.
        if open_line and out.isatty():
            out.write("\n")
            out.flush()

    try:
        for event in stream:
            if as_json:
                record = {"event": _EVENT_NAMES[type(event)], **as_dict(event)}
                out.write(json.dumps(record) + "\n")
                out.flush()
            elif isinstance(event, TokenChunk) and event.text:
                out.write(event.text)
                out.flush()
                open_line = not event.text.endswith("\n")
            if isinstance(event, Started):
                started = event
            elif isinstance(event, Finished):
                end_line()
                if not quiet:
                    click.echo(_stats_line(started, event), err=True)
    except (TilertError, KeyboardInterrupt):
        end_line()
        raise


def _cancel_after_interrupt(client: Client, stream: GenerateStream | None, request_id: str) -> None:
    # Tell the server by id first (it frees the slot even if a proxy sits in
    # between and does not forward the stream's cancellation), then drop the call.
    try:
        client.cancel([request_id], timeout=2.0)
    except (TilertError, KeyboardInterrupt) as err:
        if isinstance(err, TilertError):
            click.echo(f"warning: Cancel failed: {err}", err=True)
    finally:
        if stream is not None:
            stream.close()


@main.command()
@click.argument("prompt", required=False)
@click.option("--max-tokens", type=int, help="Upper bound on generated tokens.")
@click.option("--temperature", type=float, help="0 is greedy.")
@click.option("--top-p", type=float)
@click.option("--top-k", type=int)
@click.option("--min-p", type=float)
@click.option("--seed", type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option(
    "--chat/--raw",
    default=True,
    show_default=True,
    help="Send the prompt as one user chat message, or as raw text.",
)
@click.option("--system", help="System message (chat mode).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event on stdout.")
@click.option("--request-id", help="Request id (default: a fresh random one).")
@click.option("--quiet", "-q", is_flag=True, help="No statistics on stderr.")
@_connection_options
def generate(
    conn: _Conn,
    prompt: str | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    seed: int | None,
    stop: tuple[str, ...],
    chat: bool,
    system: str | None,
    as_json: bool,
    request_id: str | None,
    quiet: bool,
) -> None:
    """Stream a completion of PROMPT (or of stdin) to stdout."""
    if system is not None and not chat:
        raise click.UsageError("--system needs chat mode (drop --raw)")
    text = _read_prompt(prompt)
    if chat:
        messages = ([("system", system)] if system is not None else []) + [("user", text)]
        prompt_args: dict[str, Any] = {"messages": messages}
    else:
        prompt_args = {"prompt": text}
    # A client-chosen id is what lets Ctrl-C name this request in Cancel.
    request_id = request_id or uuid.uuid4().hex
    # Python leaves SIGINT ignored when the parent ignored it (background jobs);
    # Ctrl-C handling below relies on KeyboardInterrupt, so install it explicitly.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)

    ctx = click.get_current_context()
    out = sys.stdout
    client = conn.client()
    stream: GenerateStream | None = None
    try:
        try:
            stream = client.stream(
                **prompt_args,
                request_id=request_id,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                seed=seed,
                stop=list(stop) or None,
            )
            _print_events(stream, out, as_json, quiet)
        except KeyboardInterrupt:
            _cancel_after_interrupt(client, stream, request_id)
            click.echo(f"cancelled {request_id}", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader went away (`| head`): stop generating, exit quietly.
            if stream is not None:
                stream.close()
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(EXIT_ERROR)
    finally:
        client.close()


# ---------------------------------------------------------- other commands


@main.command()
@click.option(
    "--service",
    default=HEALTH_SERVICE_DEFAULT,
    show_default=True,
    help='Service to check ("" for the whole server).',
)
@_connection_options
def health(conn: _Conn, service: str) -> None:
    """Print the serving status; exit 0 only when SERVING."""
    with conn.client() as client:
        status = client.health_status(service)
    click.echo(status.value)
    if status is not HealthStatus.SERVING:
        click.get_current_context().exit(EXIT_ERROR)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_connection_options
def info(conn: _Conn, as_json: bool) -> None:
    """Describe the loaded model and the server."""
    with conn.client() as client:
        model = as_dict(client.model_info())
        server = as_dict(client.server_info())
    if as_json:
        click.echo(json.dumps({"model": model, "server": server}))
        return
    for title, section in (("model", model), ("server", server)):
        click.echo(f"{title}:")
        for key, value in section.items():
            click.echo(f"  {key}: {value}")


@main.command()
@click.argument("request_ids", nargs=-1, required=True)
@_connection_options
def cancel(conn: _Conn, request_ids: tuple[str, ...]) -> None:
    """Cancel requests by id; prints the ids that were queued or running."""
    with conn.client() as client:
        cancelled = client.cancel(list(request_ids))
    for rid in cancelled:
        click.echo(rid)
    missing = [rid for rid in request_ids if rid not in set(cancelled)]
    if missing:
        click.echo(f"not in flight: {' '.join(missing)}", err=True)


if __name__ == "__main__":
    main()
