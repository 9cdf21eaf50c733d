"""The argparse pieces every flowworker command line shares (``cli.py``, ``heartbeat_cli.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, exit 2 (argparse's default adds the usage block)."""
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def add_env_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--env-file',
        type=Path,
        metavar='PATH',
        help='read settings from this .env file (default: ./.env if present); the environment overrides it',
    )


def positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f'{value!r} is not a whole number of at least 1')
    return int(value)


def seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:
        raise argparse.ArgumentTypeError(f'{value!r} is not a number of seconds (0 or more)')
    return number
