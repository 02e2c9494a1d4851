"""Command-line entry points of megatron-wsm (thin wrappers live in ``tools/``)."""

from __future__ import annotations

import argparse


def command_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The argument parser of a command: its examples (``epilog``) keep their line breaks."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
