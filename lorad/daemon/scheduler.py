"""Timed triggers only: reconcile scans, gc, retry of failed jobs and the reduction window.

APScheduler 3.x with an in-memory job store, rebuilt from the config at every start: nothing is
pickled or persisted (persistent date jobs are lost on a crash, and pickled jobs break after a
refactor), because the durable work lives in our own `jobs` table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from lorad.daemon.config import Schedule
from lorad.library.db.session import DatabaseLost
from lorad.log import get_logger

log = get_logger("lorad.scheduler")


@dataclass(frozen=True)
class Actions:
    reconcile: Callable[[], object]
    gc: Callable[[], object]
    retry: Callable[[], object]
    set_window: Callable[[bool], object]


def planned_jobs(schedule: Schedule) -> list[tuple[str, object, str]]:
    """(id, trigger, action name) for each timer the schedule asks for: plain data, testable."""
    jobs: list[tuple[str, object, str]] = []
    for job_id, seconds in (("reconcile", schedule.reconcile_every), ("gc", schedule.gc_every),
                            ("retry", schedule.retry_every)):  # fmt: skip
        if seconds:
            jobs.append((job_id, IntervalTrigger(seconds=seconds), job_id))
    if schedule.window is not None:
        start, end = schedule.window.start, schedule.window.end
        jobs.append(("window-open", CronTrigger(hour=start.hour, minute=start.minute), "window-open"))
        jobs.append(("window-close", CronTrigger(hour=end.hour, minute=end.minute), "window-close"))
    return jobs


def in_window(schedule: Schedule, now: datetime) -> bool:
    return schedule.window is None or schedule.window.contains(now.time())


def build(schedule: Schedule, actions: Actions) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(
        jobstores={"default": MemoryJobStore()},
        executors={"default": ThreadPoolExecutor(max_workers=2)},
        # A timer that fired late (busy machine) still runs, once.
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
    )
    calls: dict[str, Callable[[], object]] = {
        "reconcile": actions.reconcile,
        "gc": actions.gc,
        "retry": actions.retry,
        "window-open": lambda: actions.set_window(True),
        "window-close": lambda: actions.set_window(False),
    }
    for job_id, trigger, action in planned_jobs(schedule):
        scheduler.add_job(_guarded(job_id, calls[action]), trigger, id=job_id, name=job_id, replace_existing=True)
    return scheduler


def start(schedule: Schedule, actions: Actions) -> BackgroundScheduler:
    """Set the window's current state, then start the timers."""
    actions.set_window(in_window(schedule, datetime.now()))
    scheduler = build(schedule, actions)
    scheduler.start()
    for job in scheduler.get_jobs():
        log.info("timer", id=job.id, next_run=str(job.next_run_time))
    return scheduler


def _guarded(name: str, call: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            call()
        except DatabaseLost:
            pass  # said once by the database's health; the timer fires again
        except Exception:  # noqa: BLE001 - a timer's failure is logged; the timer keeps firing
            log.exception("timer failed", timer=name)

    run.__name__ = f"lorad_{name.replace('-', '_')}"
    return run
