"""Run a real worker process for the signal and crash tests: ``python -m tests.db.worker_main URL LEASE_S``."""

from __future__ import annotations

import logging
import sys

from app.settings import Settings
from worker.loop import run_worker

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    url, lease_s = sys.argv[1], float(sys.argv[2])
    run_worker(
        Settings(database_url=url),
        lease_s=lease_s,
        idle_wait_s=0.2,
        handler_modules=["tests.db.handlers_for_tests"],
        migrate=False,
    )
