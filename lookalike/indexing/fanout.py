"""Tasks spread over several servers, plain Python (no Triton): `lookalike index` sends its embedding
batches through every server it is given with this.

Each server has `per_server` lanes (threads) that take the next task from one shared queue, so a faster
server takes more tasks, and no server ever has more than `per_server` of them in flight. A task whose
server goes away (`gone(error)` is true: for the client, unreachable past its own retries) goes back to
the front of the queue for the other servers, and that server takes no more. The spread fails when
every server has gone (`AllServersGone`, with each one's error and the tasks left undone), or at the
first other error, which is raised as it is (lanes finish the task in hand and start no other).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar, cast

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")


class AllServersGone(Exception):
    """Every server went away before the tasks were done. `errors`: each server's (by its place in the
    list given) error that took it out; `left`: the tasks not done."""

    def __init__(self, errors: dict[int, BaseException], left: int) -> None:
        shown = "; ".join(f"server {i + 1}: {type(e).__name__}: {e}" for i, e in sorted(errors.items()))
        super().__init__(f"every server went away with {left} task(s) left ({shown})")
        self.errors = dict(errors)
        self.left = left


@dataclass
class Spread(Generic[R]):
    """The result of each task, in the tasks' order; which server (its place) did each; the servers
    that went away on the way, with the error that took each out (their tasks were done by others)."""

    results: list[R]
    done_by: list[int]
    gone: dict[int, BaseException]


def spread(servers: Sequence[S], tasks: Sequence[T], work: Callable[[S, T], R], *, per_server: int,
           gone: Callable[[BaseException], bool], done: Callable[[T, R], None] | None = None) -> Spread[R]:
    """Runs `work(server, task)` for every task on `per_server` lanes per server (see the module's
    docstring). `done(task, result)` is called once per finished task, one call at a time (a progress
    bar's update)."""
    if not servers:
        raise ValueError("no server to spread the work over")
    if per_server < 1:
        raise ValueError(f"per_server must be 1 or more, got {per_server}")
    results: list[R | None] = [None] * len(tasks)
    done_by = [-1] * len(tasks)
    pending: deque[int] = deque(range(len(tasks)))
    lost: dict[int, BaseException] = {}
    state: dict[str, int] = {"in_flight": 0}
    failure: list[BaseException] = []
    cond = threading.Condition()

    def lane(s: int) -> None:
        while True:
            with cond:
                # An empty queue with tasks in flight elsewhere: one may come back from a server that goes.
                while not pending and state["in_flight"] and not failure and s not in lost:
                    cond.wait()
                if failure or s in lost or not pending:
                    return
                i = pending.popleft()
                state["in_flight"] += 1
            try:
                result = work(servers[s], tasks[i])
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
                with cond:
                    state["in_flight"] -= 1
                    if isinstance(exc, Exception) and gone(exc):
                        pending.appendleft(i)  # first in line for the servers left
                        lost.setdefault(s, exc)
                    elif not failure:
                        failure.append(exc)
                    cond.notify_all()
                return
            with cond:
                state["in_flight"] -= 1
                results[i], done_by[i] = result, s
                if done is not None:
                    done(tasks[i], result)
                cond.notify_all()

    threads = [threading.Thread(target=lane, args=(s,), name=f"lookalike-spread-{s}-{k}", daemon=True)
               for s in range(len(servers)) for k in range(per_server)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException as exc:  # Ctrl-C: the lanes start no new task
        with cond:
            failure.append(exc)
            cond.notify_all()
        raise
    if failure:
        raise failure[0]
    if pending:
        raise AllServersGone(lost, len(pending))
    return Spread(cast("list[R]", results), done_by, lost)  # every slot is filled: nothing is pending
