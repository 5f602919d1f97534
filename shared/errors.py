"""Errors a user can fix, and the one place that turns them into a single line on stderr."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


class UserError(Exception):
    """Bad input: a missing file, an unreachable hub, a corrupt checkpoint. Printed as one line."""


class ConfigError(UserError):
    """An unknown key, a wrong type or an impossible combination in a config."""


def _argparse_error(parser: argparse.ArgumentParser, message: str):
    raise UserError(f"{parser.prog}: {message} (see --help)")


def run_main(main: Callable[[], object]) -> None:
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit status 2.
    Argument errors too: argparse would print its usage block first, several lines."""
    argparse.ArgumentParser.error = _argparse_error
    try:
        main()
    except UserError as e:
        msg = " ".join(str(e).split())  # one line, whatever the message held
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
