"""Where a block's decompositions run: in this process (`local`) or as Ray tasks (`ray`, the optional extra
`layerzip[ray]`) on the cluster at RAY_ADDRESS, or on a local cluster started for the run.

Both map one function over a block's modules and return the results in order, so the result never depends on
the executor. The local one runs each job as its result is asked for, so one module's float64 copies are held at
a time. Ray moves each distinct statistics object (a Gram shared by q/k/v) to its object store once.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

from .errors import LayerzipError

EXECUTORS = ("local", "ray")


class LocalExecutor:
    name = "local"

    def map(self, fn: Callable, jobs: Iterable[tuple]) -> Iterator:
        return (fn(*job) for job in jobs)

    def close(self) -> None:
        pass


class RayExecutor:
    """Ray tasks, one per module. `workers`: CPUs of the local cluster started when RAY_ADDRESS is unset (default:
    all). Arguments that are the same object in several jobs are put once."""
    name = "ray"

    def __init__(self, workers: int | None = None):
        try:
            import ray
        except ImportError:
            raise LayerzipError("--executor ray needs Ray: pip install 'layerzip[ray]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            address = os.environ.get("RAY_ADDRESS")
            kw = {"address": address} if address else {"num_cpus": workers or os.cpu_count(),
                                                       "include_dashboard": False}
            try:
                ray.init(log_to_driver=False, configure_logging=False, **kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise LayerzipError(f"cannot start or reach a Ray cluster ({str(e).splitlines()[0]}); check "
                                    "RAY_ADDRESS or use --executor local") from None
        self._remote = {}

    def map(self, fn: Callable, jobs: Iterable[tuple]) -> list:
        ray = self.ray
        jobs = list(jobs)                   # alive until every put: ids identify the shared arguments
        remote = self._remote.get(fn) or self._remote.setdefault(fn, ray.remote(fn))
        refs: dict[int, object] = {}

        def ref(x):
            if x is None or isinstance(x, (int, float, str, bool)):
                return x
            if id(x) not in refs:
                refs[id(x)] = ray.put(x)
            return refs[id(x)]
        futures = [remote.remote(*(ref(a) for a in job)) for job in jobs]
        return ray.get(futures)

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


def make_executor(name: str | None, workers: int | None = None):
    if name in (None, "local"):
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(workers)
    raise LayerzipError(f"--executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
