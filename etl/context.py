"""Everything an etl handler needs, built once by :mod:`etl.app`."""

from __future__ import annotations

from dataclasses import dataclass

from etl import pipeline
from etl.scheduler import Scheduler


@dataclass
class EtlContext:
    # What a run needs (settings, sources, the warehouse); also what etl.__main__ builds.
    pipeline: pipeline.Context
    scheduler: Scheduler
