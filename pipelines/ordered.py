"""A shard task's loop: fetch items on threads, convert them on the calling thread, hand them on in order.

Downloads run ahead on ``threads`` threads; the calling thread converts each one as it arrives (in
the order downloads finish, one at a time, so one image is decoded at a time per task) and hands the
results on in input order, so the shard's bytes do not depend on timing. A download that stalls (a
server slow to answer, a SYN resent a second later) holds back only its own place: the others go on
behind it, are converted and wait, while the downloaded bytes waiting hold under ``held_bytes``
(past that, the stall is waited out).

The threads and the caller meet only at two ``queue.SimpleQueue``s (put and get in C). A converter
thread of its own and a ``Future`` per download had cost each image 14 context switches (6 now, ``perf
stat`` on one task), 5 % of a task's CPU and 10 % of its wall time.
"""
from __future__ import annotations

import threading
from queue import Empty, SimpleQueue
from typing import Callable, Iterator, Optional, TypeVar

T = TypeVar("T")
D = TypeVar("D")
R = TypeVar("R")


def fetch_and_convert(fetch: Callable[[T], D], convert: Callable[[D], R], items: list[T], threads: int,
                      held_bytes: int, size: Callable[[D], int],
                      waiting: Callable[[], None] = lambda: None) -> Iterator[tuple[T, Optional[R], Optional[Exception]]]:
    """``(item, result, None)`` or ``(item, None, error)`` for each item, in input order, where result
    is ``convert(fetch(item))`` and error what either raised. With ``threads``, at most ``2 x threads``
    downloads are unfinished at a time; ``waiting`` is called each time the caller is about to wait on
    one (a task flushes its output then). With none (items that are local files, read in microseconds),
    each item is fetched and converted in turn, since handing a read to a thread costs more than the read."""
    if threads <= 0:
        for item in items:
            try:
                yield item, convert(fetch(item)), None
            except Exception as e:  # noqa: BLE001 - a failure is the item's, handed on in its place
                yield item, None, e
        return
    todo: SimpleQueue = SimpleQueue()
    done: SimpleQueue = SimpleQueue()

    def worker() -> None:
        while (job := todo.get()) is not None:
            index, item = job
            try:
                done.put((index, fetch(item), None))
            except Exception as e:  # noqa: BLE001
                done.put((index, None, e))

    workers = [threading.Thread(target=worker, name=f"fetch_{k}", daemon=True) for k in range(threads)]
    for w in workers:
        w.start()
    ready: dict[int, tuple] = {}  # converted (or failed) results waiting for their turn
    sizes: dict[int, int] = {}
    sent = running = held = 0  # downloads handed out, not finished; bytes downloaded, not handed on
    try:
        for turn in range(len(items)):
            while turn not in ready:
                while sent < len(items) and running < 2 * threads and held < held_bytes:
                    todo.put((sent, items[sent]))
                    sent += 1
                    running += 1
                if done.empty():
                    waiting()
                index, data, error = done.get()  # ``turn`` was sent (in order) and is unfinished: it comes
                running -= 1
                if error is None:
                    sizes[index] = size(data)
                    held += sizes[index]
                    try:
                        ready[index] = (convert(data), None)
                    except Exception as e:  # noqa: BLE001
                        ready[index] = (None, e)
                else:
                    ready[index] = (None, error)
            result, error = ready.pop(turn)
            held -= sizes.pop(turn, 0)
            yield items[turn], result, error
    finally:
        try:  # stopped early: downloads not begun stay undone
            while True:
                todo.get_nowait()
        except Empty:
            pass
        for _ in workers:
            todo.put(None)
        for w in workers:  # each ends after its download in progress (bounded by the deadline)
            w.join()
