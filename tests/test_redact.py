"""Credentials inside URIs never reach MLflow params or the resolved config YAML (pretrain.redact)."""
from __future__ import annotations

import re

import pytest
import yaml

from pipelines.config import ConfigError, flatten, leaves, load_config
from pipelines.train_job import RESOLVED_CONFIG, resolved_config, write_resolved_config
from pretrain.redact import redact, redact_uri

PASSWORD = "s3cr3t-pw"
SIGNATURE = "X-Amz-Signature=deadbeef0123"
SIGNED = f"https://bucket.s3.amazonaws.com/index.csv?X-Amz-Credential=AKIDEXAMPLE%2F20240101&{SIGNATURE}"


@pytest.mark.parametrize("uri, expected", [
    (f"http://user:{PASSWORD}@host:5000", "http://host:5000"),
    (f"https://user:{PASSWORD}@host:5000/api/x?token=t#frag", "https://host:5000/api/x"),
    (SIGNED, "https://bucket.s3.amazonaws.com/index.csv"),
    ("https://host?X-Amz-Credential=AKID/2024/us-east-1", "https://host"),  # a "/" in a query with no path
    (f"http://user:p?w#{PASSWORD}@host/x", "http://host/x"),  # unencoded ? and # inside a password
    ("s3://bucket/a@b/c.tar", "s3://bucket/a@b/c.tar"),  # an @ in the path is no credential
    ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://db:5432/mlflow"),
    ("/data/images?x", "/data/images?x"),  # not a URI: a local path is left alone
    ("builtin:fractal", "builtin:fractal"),
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_redact_finds_uris_in_text_and_nested_values():
    text = f"pipe:curl -s '{SIGNED}' and http://u:{PASSWORD}@h:5000/x"
    value = {"a": [text, 3, None], "b": ("http://ok:8080/p",), "c": {"d": f"ftp://u:{PASSWORD}@f/x"}}
    out = redact(value)
    assert PASSWORD not in str(out) and SIGNATURE not in str(out)
    assert out["a"][0] == "pipe:curl -s 'https://bucket.s3.amazonaws.com/index.csv and http://h:5000/x"
    assert out["a"][1:] == [3, None] and out["b"] == ("http://ok:8080/p",) and out["c"] == {"d": "ftp://f/x"}


def _secret_config(tmp_path):
    return load_config(None, [f"workdir={tmp_path / 'work'}", f"tracking.uri=http://user:{PASSWORD}@host:5000",
                              f"shard.source={SIGNED}"])


def test_flatten_holds_no_credentials_but_leaves_does(tmp_path):
    cfg = _secret_config(tmp_path)
    params = flatten(cfg)
    assert PASSWORD not in str(params) and SIGNATURE not in str(params)
    assert params["tracking.uri"] == "http://host:5000"
    assert params["shard.source"] == "https://bucket.s3.amazonaws.com/index.csv"
    assert params.keys() == leaves(cfg).keys() and params["pretrain.lr"] == cfg.pretrain.lr
    assert leaves(cfg)["tracking.uri"] == cfg.tracking.uri  # the raw values, for `submit` to hand on


def test_written_resolved_yaml_holds_no_credentials(tmp_path):
    cfg = _secret_config(tmp_path)
    path = write_resolved_config(cfg)
    assert path == str(tmp_path / "work" / RESOLVED_CONFIG)
    text = open(path).read()
    assert PASSWORD not in text and SIGNATURE not in text
    assert yaml.safe_load(text)["tracking"]["uri"] == "http://host:5000"
    assert resolved_config(cfg) == yaml.safe_load(text)  # the dict logged as an artifact and given to workers


@pytest.mark.parametrize("key, value, shown", [
    ("pretrain.shards", f"https://host/shards-{{0..3}}.tar?{SIGNATURE}", "https://host/shards-{0..3}.tar"),
    ("workdir", f"s3://AKID:{PASSWORD}@bucket/w", "s3://bucket/w"),
])
def test_worker_locations_with_a_credential_exit_2(tmp_path, key, value, shown):
    """The workers read these from the redacted dict: a signed URL would reach them unsigned."""
    cfg = load_config(None, [f"workdir={tmp_path / 'work'}", f"{key}={value}"])
    with pytest.raises(ConfigError, match=re.escape(f"{key}: '{shown}' carries a credential")) as e:
        resolved_config(cfg)
    assert SIGNATURE not in str(e.value) and PASSWORD not in str(e.value)
