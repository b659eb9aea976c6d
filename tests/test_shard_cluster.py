"""The shard stage on a 2-node Ray cluster (``ray.cluster_utils.Cluster``): shards are made on both
nodes, and the output is byte for byte the single-node output."""
from __future__ import annotations

import json

import pytest

from pipelines.config import load_config, replace
from pipelines.shard import run_shard_stage
from shard_inputs import ImageServer, jpeg


@pytest.mark.timeout(300)
def test_two_nodes_make_the_same_shards(ray_local, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    # Images answered after 0.3 s each: a task then holds its node's one CPU long enough that the next
    # ones must go to the other node (fast tasks would all reuse the first node's worker).
    files = {f"{c}_{i}.jpg": jpeg(10 * c + i, (90, 70)) for c in range(2) for i in range(12)}
    server = ImageServer(files, slow_s=0.3).__enter__()
    index = tmp_path / "index.csv"
    index.write_text("path,label\n" + "".join(f"{server.url}/slow/{name},class{name[0]}\n" for name in files))
    cfg = replace(load_config(None), **{"workdir": str(tmp_path / "wd"), "shard.source": str(index),
                                        "shard.samples_per_shard": 3, "shard.image_size": 48,
                                        "shard.download.threads": 2, "shard.download.allow_private": True})
    single = run_shard_stage(cfg, out_dir=str(tmp_path / "single"))

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        multi = run_shard_stage(replace(cfg, **{"ray.address": cluster.address}), out_dir=str(tmp_path / "multi"))
    finally:
        ray.shutdown()
        cluster.shutdown()
        server.__exit__(None, None, None)

    assert multi == single
    used = {json.load(open(tmp_path / "multi" / f"{i:06d}.stats.json"))["node_id"] for i in range(8)}
    assert used == nodes  # both nodes made shards
    for shard in single["shards"]:
        a = open(tmp_path / "single" / shard["name"], "rb").read()
        assert a == open(tmp_path / "multi" / shard["name"], "rb").read(), shard["name"]
