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


@contextmanager
def one_line_errors():
    """Known user errors (bad config, bad data, missing files or weights) print one line and exit 2."""
    from .model.backbone import WeightsUnavailable
    from .data.coco import DatasetError
    try:
        yield
    except (ConfigError, DatasetError, WeightsUnavailable, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
