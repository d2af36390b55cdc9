"""What every command line shares: a mistake in the flags is one line on stderr and exit status 2.

absl prints "FATAL Flags parsing error: ..." plus a hint and exits with status 1; argparse prints its usage and
the error on two lines; config_flags embeds a whole traceback in its message. ``parse_absl_flags`` (the
``flags_parser`` of ``absl.app.run``) and ``ArgumentParser`` turn each into ``error: bad flag: ...``.
"""

from __future__ import annotations

import argparse
import sys


def one_line(e: BaseException) -> str:
    """An exception's message in one line: the frames of an embedded traceback dropped, its last line kept."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        head = lines[0].split("Error whilst parsing config file")[0].rstrip(": ")
        return f"{head}: {lines[-1]}" if head else lines[-1]
    if "Failed loading config file" in lines[0]:  # "Attempted [Relative path]: X  [Errno 2] ...": the path, the cause
        path = next((ln for ln in lines[1:] if not ln.startswith(("Attempted", "["))), "")
        return f"--config {path}: {lines[-1]}"
    if isinstance(e, (AttributeError, KeyError)) and len(lines) == 1 and lines[0][:1] in "\"'":
        return f"no config field {lines[0].strip(chr(34))}; the recipe (configs/) lists the fields"
    return " ".join(" ".join(lines).split())[:400]


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_absl_flags(argv: list[str], *, check=None) -> list[str]:
    """absl flag parsing with one-line errors; ``check()`` (optional) runs after parsing, inside the same guard
    (config_flags defers a config file that failed to load to its first use)."""
    from absl import flags

    try:
        argv = flags.FLAGS(argv)
        if check is not None:
            check()
        return argv
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        # config_flags reports an unknown --config.field as AttributeError, a bad recipe argument as ValueError
        # carrying the recipe's traceback, a missing file as OSError
        fail(f"bad flag: {one_line(e)}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors, exit status 2."""

    def error(self, message: str):
        fail(f"{message} (see {self.prog} --help)")
