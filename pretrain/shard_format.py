"""Names of the shard layout, shared by its writer (``pipelines/shard.py``) and its readers (the loader).

A shard folder holds ``NNNNNN.tar`` with ``NNNNNN.stats.json`` beside each (its commit marker), the
stage's claim ``STAGE_MARKER`` (written first), ``FAILURES`` (every failed sample, merged from the stats
files) and ``MANIFEST`` (written last): a folder with the claim but no manifest is a shard run that has
not finished, and is not read. ``PREVIEW`` is the contact sheet ``vitscale shard --preview`` draws.
"""
FORMAT = "vitscale-shards/1"
MANIFEST = "manifest.json"
STAGE_MARKER = ".vitscale-shards.json"
FAILURES = "failures.parquet"
PREVIEW = "preview.png"
