"""Run host tools (``mount``, ``mkfs.ext4``, ``debootstrap``, OCI runtimes) off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class CommandResult:
    """Outcome of :func:`run_command`.

    Attributes:
        argv: the command that ran.
        returncode: exit status (negative: killed by that signal).
        stdout: decoded standard output.
        stderr: decoded standard error.
    """

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.returncode == 0

    def describe(self) -> str:
        """One line for errors and logs: the tool, its status and the tail of its stderr."""
        tail = (self.stderr.strip() or self.stdout.strip()).splitlines()[-3:]
        return f"{os.path.basename(self.argv[0])} exited {self.returncode}: {' | '.join(tail)}"


class CommandError(Exception):
    """A command failed or ran past its deadline.

    Attributes:
        result: the finished command, or ``None`` when it was killed at the deadline.
    """

    def __init__(self, message: str, result: CommandResult | None = None) -> None:
        self.result = result
        super().__init__(message)


async def run_command(
    *argv: str,
    timeout_s: float = 60.0,
    check: bool = True,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
) -> CommandResult:
    """Run ``argv`` in its own session and collect its output.

    At the deadline the whole process group is killed (tools like ``debootstrap`` fork
    helpers that would otherwise outlive the timeout).

    Args:
        argv: program and arguments; the program is looked up in ``PATH``.
        timeout_s: deadline in seconds.
        check: raise :class:`CommandError` on a non-zero exit status.
        stdin: bytes fed to standard input (``/dev/null`` when ``None``).
        env: full environment (inherited when ``None``).

    Returns:
        The finished command.

    Raises:
        CommandError: the deadline passed, or (``check``) the exit status was not 0.
        FileNotFoundError: the program does not exist.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
    except TimeoutError:
        await _kill_group(proc)
        raise CommandError(f"{argv[0]} did not finish within {timeout_s:g} s") from None
    except asyncio.CancelledError:
        await _kill_group(proc)
        raise
    result = CommandResult(
        argv=tuple(argv),
        returncode=proc.returncode if proc.returncode is not None else -1,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
    )
    if check and not result.ok:
        raise CommandError(result.describe(), result)
    return result


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await asyncio.shield(proc.wait())
