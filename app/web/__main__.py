"""``python -m app.web [--host H] [--port P]``: serve the dashboard with settings from the environment."""

from __future__ import annotations

import argparse
import logging

from app.settings import Settings
from app.web.main import serve


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m app.web", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="server processes (one core's worth of pages each)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(None if args.workers > 1 else Settings(), host=args.host, port=args.port, workers=args.workers)


if __name__ == "__main__":
    main()
