"""`parallel_map`: a per-molecule RDKit function over many molecules, as Ray tasks when Ray is running.

Featurising and InChI-keying are pure Python + RDKit, one core each, and on a fresh machine they are
the first wait of the main job: its driver featurised 62,623 molecules (the derived corpus, validation
and the 33,010-molecule pool) in 103-129 s and computed the held-out check's 30,209 InChIKeys in 18-20
s on 2026-12-03's 2-core machine, one core busy. The driver of a training run or a sweep has Ray
started, so the work goes to Ray tasks, one CPU each (Ray's own worker processes: nothing is forked
from a driver running Ray's threads, and no user script is re-imported as multiprocessing's spawn
would). Without Ray (tests, a plain `tmr.train.fit`) it runs in this process, as before.
"""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

from tqdm.auto import tqdm

Item, Result = TypeVar("Item"), TypeVar("Result")
CHUNK = 1_000  # items per task: a task costs ~1 ms to schedule, 1,000 molecules ~2 s to featurise


def parallel_map(function: Callable[[Item], Result], items: Iterable[Item], desc: str, progress: bool = True
                 ) -> list[Result]:
    """[function(item) for item in items], in order; split into Ray tasks of CHUNK items when called in a
    Ray driver with a CPU free and there is more than one chunk (elsewhere: in this process). `function`
    must be importable (module level) and should return its failures rather than raise them (a raised
    error ends the whole map)."""
    try:
        import ray  # the train extra
    except ImportError:
        ray = None
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, disable=not progress, mininterval=2)
    # only a driver with free CPUs hands work to tasks: a Ray Train worker or a Tune trial holds the CPUs its
    # tasks would wait for, and so may a driver's own actors
    on_ray = (ray is not None and len(items) > CHUNK and ray.is_initialized()
              and ray.get_runtime_context().worker.mode == ray.SCRIPT_MODE and ray.available_resources().get("CPU", 0) >= 1)
    if not on_ray:
        results = []
        for item in items:
            results.append(function(item))
            bar.update()
        bar.close()
        return results
    task = ray.remote(num_cpus=1)(_apply)
    pending = [task.remote(function, items[start:start + CHUNK]) for start in range(0, len(items), CHUNK)]
    done: dict = {}
    waiting = list(pending)
    while waiting:  # fetched as they finish (the bar moves, and the object store is drained as it goes)
        ready, waiting = ray.wait(waiting, num_returns=1)
        done[ready[0]] = ray.get(ready[0])
        bar.update(len(done[ready[0]]))
    bar.close()
    return [result for reference in pending for result in done.pop(reference)]


def _apply(function: Callable[[Item], Result], items: list[Item]) -> list[Result]:
    return [function(item) for item in items]
