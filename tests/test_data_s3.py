"""The streaming loader reading shards from a real S3 server (moto's, see conftest), directly and through
``s3_proxy.FaultyProxy``, which resets connections mid-response and throttles chosen objects."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import s3fs
import torch

from pretrain import object_stream, storage
from pretrain.data import make_eval_loader, resolve_shards
from s3_proxy import FaultyProxy
from test_data import IMG, SIZES, _take, _train, _write_shards

# Every other GET is cut by a reset after 16 KiB, mid-body: each test shard is 25-100 KiB.
CUT = {"cut": lambda n: n % 2 == 0, "cut_after": 16 * 1024}


@pytest.fixture
def shards(s3_bucket: str, tmp_path: Path) -> tuple[list[str], list[str]]:
    """test_data's shards and manifest, on local disk and in the bucket: (s3 urls, local urls)."""
    _write_shards(tmp_path)
    prefix = storage.join(s3_bucket, "shards")
    storage.upload_many((str(p), storage.join(prefix, p.name)) for p in sorted(tmp_path.iterdir()))
    (urls, _), (local, _) = resolve_shards(prefix), resolve_shards(str(tmp_path))
    assert [storage.basename(u) for u in urls] == [storage.basename(u) for u in local] and urls[0].startswith("s3://")
    return urls, local


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(object_stream, "RETRY_BACKOFF_S", 0.001)


@contextlib.contextmanager
def through(endpoint: str) -> Iterator[None]:
    """s3:// reaches ``endpoint`` meanwhile (fsspec caches filesystems, each holding its endpoint)."""
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
        s3fs.S3FileSystem.clear_instance_cache()


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


def test_stream_resumes_at_the_byte_where_the_connection_broke(shards, s3_server, caplog):
    urls, local = shards
    release = threading.Event()
    with FaultyProxy(s3_server, cut=lambda n: n == 1, cut_after=16 * 1024, hold=release) as proxy, \
            through(proxy.endpoint), caplog.at_level(logging.WARNING, logger="pretrain.storage"):
        retries = []
        with object_stream.open_stream(urls[1], on_retry=retries.append) as stream:
            head = stream.read(1000)  # bytes of the first response, taken before it breaks
            release.set()
            data = head + stream.read()
    assert data == Path(local[1]).read_bytes()
    assert proxy.resets == 1 and len(retries) == 1 and proxy.requests == 2
    assert len(proxy.ranges) == 1 and 1000 <= proxy.ranges[0] < 16 * 1024  # resumed, not read again
    assert f"at byte {proxy.ranges[0]}, retry 1/{object_stream.READ_RETRIES}" in caplog.text


def test_resets_are_resumed_counted_and_leave_the_batches_unchanged(shards, s3_server):
    urls, local = shards
    on_disk = _take(_train(local, num_workers=0), 12)
    direct_loader = _train(urls, num_workers=0)
    direct = _take(direct_loader, 12)
    with FaultyProxy(s3_server, **CUT) as proxy, through(proxy.endpoint):
        faulty_loader = _train(urls, num_workers=1)  # a loader process: the endpoint and counts cross over
        faulty = _take(faulty_loader, 12)
        faulty_loader.close()
    assert direct_loader.counts()["read_retries"] == 0
    counts = faulty_loader.counts()
    assert proxy.resets > 0 and 0 < counts["read_retries"] <= proxy.resets
    assert counts["bad_shards"] == 0 and counts["samples"] == 12 * 4
    assert _same(faulty, direct) and _same(direct, on_disk)


def test_eval_pass_through_resets_sees_every_sample_once(shards, s3_server, caplog):
    urls, _ = shards
    with FaultyProxy(s3_server, **CUT) as proxy, through(proxy.endpoint), \
            caplog.at_level(logging.WARNING, logger="pretrain.storage"):
        loader = make_eval_loader(urls, batch_size=4, rank=0, world_size=1, img_size=IMG, num_workers=0)
        seen = Counter(label for _, labels in loader for label in labels.tolist())
    assert seen == Counter(range(sum(SIZES)))
    assert loader.counts()["read_retries"] > 0 and loader.counts()["bad_shards"] == 0
    assert "retry 1/" in caplog.text


def test_shard_that_keeps_failing_is_skipped_and_counted_and_the_stream_goes_on(shards, s3_server, monkeypatch,
                                                                                caplog):
    monkeypatch.setattr(object_stream, "READ_RETRIES", 3)
    urls, _ = shards
    missing = storage.join(storage.parent(urls[0]), "missing.tar")  # not transient: no retries
    doomed = "/".join(urls[1].split("/")[-3:])  # bucket/shards/000001.tar, as in the request line
    good = set(range(SIZES[0])) | set(range(SIZES[0] + SIZES[1], sum(SIZES)))
    with FaultyProxy(s3_server, throttle=[f"/{doomed}"]) as proxy, through(proxy.endpoint), \
            caplog.at_level(logging.WARNING):
        loader = make_eval_loader(urls + [missing], batch_size=4, rank=0, world_size=1, img_size=IMG,
                                  num_workers=0)
        seen = [label for _, labels in loader for label in labels.tolist()]
        assert sorted(seen) == sorted(good)
        assert loader.counts()["bad_shards"] == 2 and loader.counts()["read_retries"] == 3
        assert proxy.throttled == 1 + 3  # the first try and our 3 retries: no hidden library retries
        assert "SlowDown" in caplog.text and "gave up" in caplog.text and "missing.tar" in caplog.text

        train = _train(urls + [missing], num_workers=0)
        labels = {y for _, ys in _take(train, 10) for y in ys.tolist()}
    assert labels <= good
    counts = train.counts()
    doomed_draws = counts["read_retries"] // 3
    assert doomed_draws > 0 and counts["read_retries"] == 3 * doomed_draws
    assert proxy.throttled - 4 - 4 * doomed_draws in (0, 1)  # 1: the next shard, requested ahead, was the doomed one
    assert counts["samples"] == 40 and counts["bad_shards"] > doomed_draws  # the missing shard's draws too
