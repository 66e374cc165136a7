"""The one measuring loop: requests in, `CompileReport`s out.

Every caller that wants a candidate measured goes through `measure` (the planner, `explore sweep`,
`explore flops`, `codesign compile`, the tests). In order, for each request:

1. the closed form (`target="analytic"`) is answered in-process: microseconds, never cached;
2. the `reuse` map (a sweep's earlier reports of the same program, keyed by strategy spec);
3. the on-disk cache (`CompileCache`, keyed by `cache_key`);
4. otherwise an executor compiles it in a worker process with a hard timeout: `local` (worker
   processes on this machine, the default) or `ray` (a task per compile on a Ray cluster, for
   searches that outgrow one machine; `pip install -e ".[ray]"`).

A failure or timeout is a report (outcome `error`/`timeout`), never an exception, so a bad candidate
becomes a row. Finished reports are cached as they arrive (timeouts never are), so Ctrl-C
(`KeyboardInterrupt`) kills the running compiles at once and keeps every finished one.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from codesign.compile.cache import CompileCache, cache_key
from codesign.compile.devices import TargetError
from codesign.compile.targets import compile_candidate, resolve_target
from codesign.compile.worker import CompileRequest, compile_in_subprocess, kill_running_workers
from codesign.report import CompileReport

EXECUTORS = ("local", "ray")
RAY_INSTALL_HINT = 'pip install -e ".[ray]"'


class ExecutorError(ValueError):
    """An unknown executor, or one this machine cannot start (the message says what to install)."""


@dataclass
class MeasureStats:
    analytic: int = 0
    reused: int = 0
    cache_hits: int = 0
    compiled: int = 0

    @property
    def served_without_compiling(self) -> int:
        return self.reused + self.cache_hits


class _Local:
    """Worker processes on this machine, `workers` at a time."""

    def __init__(self, workers: int):
        self.pool = cf.ThreadPoolExecutor(max_workers=max(1, workers))

    def submit(self, req: CompileRequest, timeout_s: float) -> cf.Future:
        return self.pool.submit(_compile, req, timeout_s)

    def shutdown(self, cancel: bool) -> None:
        if cancel:
            self.pool.shutdown(wait=False, cancel_futures=True)
            kill_running_workers()
        self.pool.shutdown(wait=True)


class _Ray:
    """One Ray task per compile; each task runs the same worker subprocess, timeout included."""

    def __init__(self, workers: int, address: str | None):
        try:
            import ray
        except ImportError:
            raise ExecutorError(f"--executor ray needs Ray: {RAY_INSTALL_HINT}") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(
                address=address or os.environ.get("RAY_ADDRESS"),
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
            )
        self.remote = ray.remote(num_cpus=1)(_ray_compile)
        self.refs: list = []

    def submit(self, req: CompileRequest, timeout_s: float) -> cf.Future:
        ref = self.remote.remote(req.to_json(), timeout_s)
        self.refs.append(ref)
        return ref.future()

    def shutdown(self, cancel: bool) -> None:
        if cancel:
            for ref in self.refs:
                self.ray.cancel(ref, force=True)


def _compile(req: CompileRequest, timeout_s: float) -> CompileReport:
    """One request in a worker subprocess (what every executor runs)."""
    return compile_in_subprocess(
        req.cfg,
        req.workload,
        req.strategy,
        req.hardware,
        req.target,
        timeout_s,
        req.save_hlo,
        req.max_compile_devices,
        req.xla_flags,
    )


def _ray_compile(request_json: dict, timeout_s: float) -> CompileReport:
    return _compile(CompileRequest.from_json(request_json), timeout_s)


def make_executor(name: str, workers: int, address: str | None = None):
    if name == "local":
        return _Local(workers)
    if name == "ray":
        return _Ray(workers, address)
    raise ExecutorError(f"unknown executor {name!r}; use one of {', '.join(EXECUTORS)}")


def _resolved(req: CompileRequest) -> CompileRequest | CompileReport:
    try:
        target = resolve_target(req.target, req.hardware)
    except TargetError as e:
        return CompileReport(outcome="error", target=str(req.target), stage="build", message=str(e))
    return req if target == req.target else dataclasses.replace(req, target=target)


def measure(
    requests: Sequence[CompileRequest],
    *,
    workers: int = 1,
    timeout_s: float = 600.0,
    cache: CompileCache | None = None,
    reuse: dict[str, CompileReport] | None = None,
    progress: Callable[[int, CompileReport], None] | None = None,
    executor: str = "local",
    address: str | None = None,
    stats: MeasureStats | None = None,
) -> list[CompileReport]:
    """Reports in request order. `progress(index, report)` is called from this thread as each lands."""
    stats = stats if stats is not None else MeasureStats()
    reports: list[CompileReport | None] = [None] * len(requests)
    keys: dict[int, str] = {}
    todo: list[tuple[int, CompileRequest]] = []

    def land(i: int, report: CompileReport) -> None:
        reports[i] = report
        if progress:
            progress(i, report)

    for i, raw in enumerate(requests):
        req = _resolved(raw)
        if isinstance(req, CompileReport):
            land(i, req)
        elif req.target == "analytic":
            stats.analytic += 1
            land(i, compile_candidate(req.cfg, req.workload, req.strategy, req.hardware, "analytic"))
        elif reuse is not None and req.strategy.spec in reuse:
            stats.reused += 1
            land(i, reuse[req.strategy.spec])
        else:
            keys[i] = cache_key(req)
            hit = cache.get(keys[i]) if cache is not None else None
            if hit is not None:
                stats.cache_hits += 1
                land(i, hit)
            else:
                todo.append((i, req))
    if not todo:
        return [r for r in reports if r is not None]

    pool = make_executor(executor, workers, address)
    cancel = True
    try:
        futures = {pool.submit(req, timeout_s): (i, req) for i, req in todo}
        for fut in cf.as_completed(futures):
            i, req = futures[fut]
            lost = False
            try:
                report = fut.result()
            except Exception as e:  # noqa: BLE001 - an executor failure (a lost Ray worker) is a row too
                report = CompileReport(
                    outcome="error",
                    target=req.target,
                    stage="compile",
                    full_mesh=req.strategy.mesh,
                    message=f"{executor} executor failed: {type(e).__name__}: {str(e)[:500]}",
                )
                lost = True  # says nothing about the candidate: never cached, never reused
            stats.compiled += 1
            if lost:
                land(i, report)
                continue
            if cache is not None:
                cache.put(keys[i], report)  # as it lands: an interrupted search keeps what finished
            if reuse is not None:
                reuse[req.strategy.spec] = report
            land(i, report)
        cancel = False
    finally:
        pool.shutdown(cancel=cancel)
    return [r for r in reports if r is not None]


def measure_one(
    req: CompileRequest,
    *,
    timeout_s: float = 600.0,
    cache: CompileCache | None = None,
    executor: str = "local",
) -> CompileReport:
    return measure([req], timeout_s=timeout_s, cache=cache, executor=executor)[0]
