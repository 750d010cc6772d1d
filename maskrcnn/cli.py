"""Shared command-line plumbing: config arguments and one-line errors instead of tracebacks."""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

from .config import ConfigError


def add_config_args(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    parser.add_argument("--config", default=default_config,
                        help=f"YAML config (default: {default_config})")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. --set solver.max_iter=100 model.noise.strength=0.3")


class Stopped(Exception):
    """An orderly stop (e.g. training checkpointed after SIGTERM): one line on stderr, then exit `status`."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@contextmanager
def one_line_errors():
    """Known user errors (bad config, bad data, missing files or weights) and errors of the machine (a file that
    cannot be written, a full disk: OSError) print one line and exit 2; a non-finite loss exits 3; an orderly
    stop exits with its own status."""
    from .data.coco import DatasetError
    from .model.backbone import WeightsUnavailable
    try:
        yield
    except Stopped as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.status)
    except (ConfigError, DatasetError, WeightsUnavailable, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
