"""``scaibunker shell BUNKER``: an interactive terminal on the bunker's shell (SPEC §5).

On a TTY the local terminal goes into raw mode (every key, Ctrl-C included, goes to the
remote PTY) and is restored however the command ends; its size is sent at start and on
every ``SIGWINCH``. With a non-TTY stdin the bytes are forwarded as they are and
end-of-file sends Ctrl-D. The command exits with the remote shell's exit code (255 when
the session was lost).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import threading
import tty
from typing import Any

import click

from scaigrid.client.errors import ScaiGridClientError
from scaigrid.client.shell import Shell

EXIT_LOST = 255
_READ_BYTES = 65536


def _window_size(fd: int) -> tuple[int, int] | None:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    if size.columns <= 0 or size.lines <= 0:
        return None  # a terminal that reports no size (0x0): the server's 80x24 applies
    return min(size.columns, 1000), min(size.lines, 1000)


def run_terminal(shell: Shell, stdin_fd: int, stdout_fd: int) -> int:
    """Relay between the local terminal and ``shell`` until the remote shell ends.

    Returns:
        The remote exit code, or :data:`EXIT_LOST` when the session was lost.
    """
    is_tty = os.isatty(stdin_fd)
    saved = termios.tcgetattr(stdin_fd) if is_tty else None
    wake_r, wake_w = os.pipe()
    failure: list[BaseException] = []
    resized = threading.Event()
    # Set before the wake-up byte: the receiver thread is still "alive" for a moment after
    # it wrote that byte, so is_alive() would let the loop block in select() forever.
    received_all = threading.Event()

    def receive() -> None:
        try:
            for chunk in shell:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(stdout_fd, view) :]
        except BaseException as exc:
            failure.append(exc)
        finally:
            received_all.set()
            with contextlib.suppress(OSError):
                os.write(wake_w, b"x")

    def on_winch(_signum: int, _frame: Any) -> None:
        resized.set()
        with contextlib.suppress(OSError):
            os.write(wake_w, b"w")

    previous = None
    if is_tty:
        previous = signal.signal(signal.SIGWINCH, on_winch)
    receiver = threading.Thread(target=receive, name="scaibunker-shell-output", daemon=True)
    try:
        if is_tty:
            tty.setraw(stdin_fd, termios.TCSANOW)
        receiver.start()
        stdin_open = True
        while not received_all.is_set():
            watched = [wake_r, stdin_fd] if stdin_open else [wake_r]
            try:
                ready, _, _ = select.select(watched, [], [])
            except InterruptedError:
                continue
            if wake_r in ready:
                os.read(wake_r, 64)
                if resized.is_set():
                    resized.clear()
                    size = _window_size(stdin_fd)
                    if size is not None:
                        with contextlib.suppress(Exception):
                            shell.resize(*size)
            if stdin_open and stdin_fd in ready:
                data = os.read(stdin_fd, _READ_BYTES)
                try:
                    if data:
                        shell.send(data)
                    else:
                        stdin_open = False
                        shell.send(b"\x04")
                except Exception:  # the connection closed; the receiver reports why
                    stdin_open = False
        receiver.join(timeout=5)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)
        os.close(wake_r)
        os.close(wake_w)
        shell.abort()
    if failure:
        exc = failure[0]
        if isinstance(exc, ScaiGridClientError):
            click.echo(f"\r\nerror {exc.code}: {exc.message}", err=True)
        else:
            click.echo(f"\r\nerror CONNECTION_ERROR: {exc}", err=True)
        return EXIT_LOST
    return shell.exit_code if shell.exit_code is not None else EXIT_LOST


@click.command("shell")
@click.argument("bunker")
@click.option("--user", type=click.Choice(["user", "root"]), default="user", show_default=True)
@click.option("--command", "command", help="Run this instead of the login shell.")
@click.option("--session", help="Reattach to this shs_ session.")
@click.pass_context
def shell_command(
    ctx: click.Context, bunker: str, user: str, command: str | None, session: str | None
) -> None:
    """Open an interactive shell in BUNKER and exit with its status."""
    from scaigrid.client.cli import _client

    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
    size = _window_size(stdin_fd) if os.isatty(stdin_fd) else None
    shell = _client().shell(
        bunker,
        cols=size[0] if size else None,
        rows=size[1] if size else None,
        command=command,
        user="root" if user == "root" else "user",
        session=session,
    )
    sys.stdout.flush()
    ctx.exit(run_terminal(shell, stdin_fd, stdout_fd))
