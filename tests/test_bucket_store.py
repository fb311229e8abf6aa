"""A store in an S3 bucket (vmckpt/images/bucketstore.py), against a real S3 server
(SeaweedFS, tests/framework/s3server.py): layers written on one "host" and pushed, fetched
on another (its own keys, data and runtime directories: another host id) only as far as the
chain needs, a push interrupted mid-upload that leaves nothing visible and whose leftovers
`gc` removes, a lost compare-and-swap race retried, and the failures of the object store
as one-line errors that lose no layer. The checkpoints of real guests into a bucket are in
tests/test_bucket_guests.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.framework.buckets import Host, share_key
from tests.framework.s3server import S3Server, boto3_client
from tests.test_images import assert_same_image, content, mutate, random_image
from vmckpt.cli import main
from vmckpt.errors import BucketError, CorruptLayerError, StoreError, UsageError
from vmckpt.images import keys
from vmckpt.images.bucket import BucketConfig, BucketUrl
from vmckpt.images.bucketstore import CACHE_LIMIT_ENV, BucketStore, working_path
from vmckpt.ram import RamImage


def write_chain(store: BucketStore, images: list[RamImage], parent: str | None = None) -> list[str]:
    ids: list[str] = []
    older = None
    for number, image in enumerate(images):
        manifest = store.local.write_layer(content(image, parent, older, tag=str(number)))
        ids.append(manifest.id)
        parent, older = manifest.id, image
    return ids


def objects(s3_server: S3Server, bucket: str) -> list[str]:
    client = boto3_client(s3_server.endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def test_config_from_options_environment_and_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(var, raising=False)  # fmt: skip
    config_file, creds_file = tmp_path / "config", tmp_path / "credentials"
    config_file.write_text(
        "[default]\nregion = r0\n[profile lab]\nregion = r1\nendpoint_url = http://lab:1\n"
    )
    creds_file.write_text("[lab]\naws_access_key_id = K1\naws_secret_access_key = S1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds_file))
    assert BucketConfig.resolve().region == "r0"
    lab = BucketConfig.resolve(profile="lab")
    assert (lab.endpoint, lab.region, lab.access_key, lab.secret_key) == (
        "http://lab:1",
        "r1",
        "K1",
        "S1",
    )
    assert "S1" not in repr(lab)
    monkeypatch.setenv("AWS_REGION", "r2")  # the environment before the profile
    assert BucketConfig.resolve(profile="lab").region == "r2"
    given = BucketConfig(endpoint="http://given:2")  # options before both
    assert BucketConfig.resolve(given, profile="lab").endpoint == "http://given:2"
    with pytest.raises(UsageError, match="no profile 'nope'"):
        BucketConfig.resolve(profile="nope")


def test_url_parsing() -> None:
    assert BucketUrl.parse("s3://my-bucket/a/b/") == BucketUrl("my-bucket", "a/b")
    assert str(BucketUrl.parse("s3://my-bucket")) == "s3://my-bucket"
    for bad in ("s3://", "s3://UPPER/x", "s3://ok-bucket/../x", "/tmp/x"):
        with pytest.raises(Exception, match=r"bucket|prefix|s3://"):
            BucketUrl.parse(bad)


def test_push_then_another_host_fetches_only_the_chain(
    config: BucketConfig, url: BucketUrl, hosts: tuple[Host, Host], s3_server: S3Server
) -> None:
    host_a, host_b = hosts
    rng = np.random.default_rng(7)
    images = [random_image(rng)]
    images.append(mutate(images[0], rng))
    sibling = mutate(images[0], rng)
    with host_a:
        store, created = BucketStore.open(url, config, create=True)
        assert created
        chain = write_chain(store, images)
        other = store.local.write_layer(content(sibling, chain[0], images[0], tag="s"))
        assert store.pending() == [chain[0], chain[1], other.id]
        result = store.push()
        assert result.uploaded == [chain[0], chain[1], other.id]
        assert result.bytes_uploaded > 0
        assert store.pending() == []
        catalog, _ = store.catalog("test")
        assert set(catalog.layers) == {*chain, other.id}
        store_id = store.local.store_id
        assert store_id is not None
        assert store.push().uploaded == []  # nothing left: a second push is a no-op
    keys_in_bucket = objects(s3_server, url.bucket)
    assert f"team/stores/layers/{chain[1]}/manifest.json" in keys_in_bucket
    assert "team/stores/catalog.json" in keys_in_bucket
    with host_b:
        with pytest.raises(StoreError, match="no key"):
            BucketStore.open(url, config)
        share_key(store_id, host_a, host_b)
        store_b, created = BucketStore.open(url, config)
        assert not created and store_b.local.path != store.local.path
        assert store_b.local.layer_names() == []
        layer, fetched = store_b.fetch(chain[1][:6])
        assert layer == chain[1] and fetched == chain  # the chain only, base first
        assert other.id not in store_b.local.layer_names()
        ram, _prelude, _state = store_b.local.compose(chain[1])
        assert_same_image(ram, images[1])
        assert store_b.fetch(chain[1])[1] == []  # cached: nothing fetched again
        assert store_b.verify() == sorted([*chain, other.id])
        # gc bounds the working copy: no guest of host b builds on these; fetched again.
        assert sorted(store_b.trim()) == sorted([*chain, other.id])
        assert store_b.local.layer_names() == []
        assert store_b.fetch(chain[1])[1] == chain
    with host_a:  # every layer of host a is uploaded and no head of its guests is there
        assert sorted(store.trim()) == sorted([*chain, other.id])


def test_the_working_copy_stays_within_its_bound(
    config: BucketConfig, url: BucketUrl, hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With $VMCKPT_CACHE_LIMIT a fetch makes room by removing what this host needs for
    nothing, the least recently fetched first, never the chain it fetches; verify still
    checks every layer of the bucket."""
    host_a, host_b = hosts
    rng = np.random.default_rng(11)
    base = random_image(rng)
    with host_a:
        store, _ = BucketStore.open(url, config, create=True)
        chain = write_chain(store, [base, mutate(base, rng)])
        sibling = store.local.write_layer(content(mutate(base, rng), chain[0], base, tag="s"))
        store.push()
        store_id = store.local.store_id
        assert store_id is not None
        sizes = {i: store._bytes(store.local.manifest(i)) for i in (*chain, sibling.id)}
    share_key(store_id, host_a, host_b)
    with host_b:
        store_b, _ = BucketStore.open(url, config)
        limit = sizes[chain[0]] + max(sizes[chain[1]], sizes[sibling.id]) + 4096
        monkeypatch.setenv(CACHE_LIMIT_ENV, str(limit))
        assert store_b.fetch(chain[1])[1] == chain
        assert store_b.fetch(sibling.id)[1] == [sibling.id]
        # chain[1] made room; the base, which the sibling builds on, stayed.
        held = store_b.local.layer_names()
        assert sorted(held) == sorted([chain[0], sibling.id])
        assert sum(sizes[i] for i in held) <= limit
        assert store_b.verify() == sorted([*chain, sibling.id])
        held = store_b.local.layer_names()
        assert sum(sizes[i] for i in held) <= limit, held
        monkeypatch.setenv(CACHE_LIMIT_ENV, "12 parsecs")
        with pytest.raises(StoreError, match=f"{CACHE_LIMIT_ENV}='12 parsecs' is not a size"):
            store_b.verify()


def test_a_tampered_object_is_refused_and_nothing_is_published(
    config: BucketConfig, url: BucketUrl, hosts: tuple[Host, Host], s3_server: S3Server
) -> None:
    host_a, host_b = hosts
    rng = np.random.default_rng(8)
    with host_a:
        store, _ = BucketStore.open(url, config, create=True)
        (layer,) = write_chain(store, [random_image(rng)])
        store.push()
        assert store.local.store_id is not None
        store_id = store.local.store_id
    share_key(store_id, host_a, host_b)
    client = boto3_client(s3_server.endpoint)
    key = f"team/stores/layers/{layer}/pages.bin"
    body = bytearray(client.get_object(Bucket=url.bucket, Key=key)["Body"].read())
    body[100] ^= 1
    client.put_object(Bucket=url.bucket, Key=key, Body=bytes(body))
    with host_b:
        store_b, _ = BucketStore.open(url, config)
        with pytest.raises(CorruptLayerError, match=r"pages\.bin does not match"):
            store_b.fetch(layer)
        assert store_b.local.layer_names() == []
        assert store_b.local.directory_layer_names() == []
        # A seal made without the key: refused before any file is fetched.
        client.put_object(
            Bucket=url.bucket, Key=f"team/stores/layers/{layer}/manifest.mac", Body=b"{}"
        )
        with pytest.raises(CorruptLayerError):
            store_b.fetch(layer)


def test_interrupted_upload_leaves_nothing_visible_and_gc_removes_it(
    config: BucketConfig, url: BucketUrl, hosts: tuple[Host, Host], s3_server: S3Server
) -> None:
    host_a, _ = hosts
    rng = np.random.default_rng(9)
    with host_a:
        store, _ = BucketStore.open(url, config, create=True)
        (layer,) = write_chain(store, [random_image(rng)])
        env = {**os.environ, "VMCKPT_FAULT": "kill-at:mid-upload", **s3_env(config)}
        done = subprocess.run(
            [sys.executable, "-m", "vmckpt", "push", "--store", str(url)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == -9, done.stderr
        left = [k for k in objects(s3_server, url.bucket) if f"/layers/{layer}/" in k]
        assert left, "the upload was killed before any object was written"
        catalog, _ = store.catalog("test")
        assert layer not in catalog.layers  # not visible
        assert store.pending() == [layer]  # and not lost
        assert store.gc(grace_s=3600) == []  # too young to be taken for a dead upload
        assert store.gc(grace_s=0) == [layer]
        assert not [k for k in objects(s3_server, url.bucket) if f"/layers/{layer}/" in k]
        assert store.push().uploaded == [layer]
        assert layer in store.catalog("test")[0].layers


def test_two_hosts_push_at_once_and_both_layers_are_visible(
    config: BucketConfig, url: BucketUrl, hosts: tuple[Host, Host]
) -> None:
    host_a, host_b = hosts
    rng = np.random.default_rng(10)
    with host_a:
        store_a, _ = BucketStore.open(url, config, create=True)
        assert store_a.local.store_id is not None
        store_id = store_a.local.store_id
    share_key(store_id, host_a, host_b)
    with host_b:
        store_b, _ = BucketStore.open(url, config)
    layers: dict[str, list[str]] = {}
    for name, host, store in (("a", host_a, store_a), ("b", host_b, store_b)):
        with host:
            layers[name] = write_chain(store, [random_image(rng)])
    # Both read the same catalog (generation 1); one of the swaps must lose and retry.
    for _name, host, store in (("a", host_a, store_a), ("b", host_b, store_b)):
        with host:
            assert store.catalog("test")[0].generation == 1
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def push(store: BucketStore) -> None:
        try:
            barrier.wait()
            store.push()
        except BaseException as exc:
            errors.append(exc)

    with host_a:  # the environment is the process's: both share host a's seen-generations
        threads = [threading.Thread(target=push, args=(s,)) for s in (store_a, store_b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        catalog, _ = store_a.catalog("test")
    assert set(catalog.layers) == {*layers["a"], *layers["b"]}
    assert catalog.generation == 3


def s3_env(config: BucketConfig) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": config.endpoint or "",
        "AWS_REGION": config.region or "",
        "AWS_ACCESS_KEY_ID": config.access_key or "",
        "AWS_SECRET_ACCESS_KEY": config.secret_key or "",
    }


def test_object_store_failures_are_one_line_and_lose_no_layer(
    config: BucketConfig,
    url: BucketUrl,
    hosts: tuple[Host, Host],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host_a, _ = hosts
    rng = np.random.default_rng(11)
    with host_a:
        store, _ = BucketStore.open(url, config, create=True)
        (layer,) = write_chain(store, [random_image(rng)])
        for var, value in s3_env(config).items():
            monkeypatch.setenv(var, value)
        # Credentials refused.
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        assert main(["push", "--store", str(url)]) == BucketError.exit_code
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"bucket {url}" in err and "during push" in err, err
        # Unreachable: nothing listens on that port.
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", config.secret_key or "")
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        with pytest.raises(BucketError, match="during push"):
            BucketStore.open(url, BucketConfig.resolve())[0].push()
        assert store.local.layer_names() == [layer]  # still here
        monkeypatch.setenv("AWS_ENDPOINT_URL", config.endpoint or "")
        assert main(["push", "--store", str(url)]) == 0
        assert "uploaded 1 layer" in capsys.readouterr().out
        assert layer in store.catalog("test")[0].layers


def test_cli_init_list_verify_gc_on_a_bucket(
    config: BucketConfig,
    url: BucketUrl,
    hosts: tuple[Host, Host],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host_a, _ = hosts
    for var, value in s3_env(config).items():
        monkeypatch.setenv(var, value)
    # The endpoint and region given to init only: later commands take them from this host.
    for var in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    given = ["--endpoint", config.endpoint or "", "--region", config.region or ""]
    with host_a:
        assert main(["init", str(url), *given]) == 0
        out = capsys.readouterr().out
        assert f"store {url} created" in out and "key" in out
        assert main(["init", str(url), *given]) == 0
        assert "exists already" in capsys.readouterr().out
        store, _ = BucketStore.open(url, config)
        (layer,) = write_chain(store, [random_image(np.random.default_rng(12))])
        assert main(["list", "--store", str(url)]) == 0
        assert "not uploaded" in capsys.readouterr().out
        assert main(["push", "--store", str(url)]) == 0
        assert main(["verify", "--store", str(url)]) == 0
        assert layer in capsys.readouterr().out
        assert main(["inspect", "--store", str(url), layer[:6]]) == 0
        assert layer in capsys.readouterr().out
        assert main(["gc", "--store", str(url)]) == 0
        assert f"removed {layer} from this host's working copy" in capsys.readouterr().out
        assert main(["squash", "--store", str(url), layer]) == 0
        assert "is a base layer already" in capsys.readouterr().out
        assert keys.load_key(store.local.store_id or "") is not None


def test_an_init_that_stopped_before_the_marker_is_finished_by_the_same_host_only(
    config: BucketConfig, url: BucketUrl, hosts: tuple[Host, Host], s3_server: S3Server
) -> None:
    host_a, host_b = hosts
    with host_a:
        store, _ = BucketStore.open(url, config, create=True)
    marker = f"{url.prefix}/vmckpt-store.json"
    boto3_client(s3_server.endpoint).delete_object(Bucket=url.bucket, Key=marker)
    with host_b, pytest.raises(StoreError, match=r"no vmckpt-store\.json"):
        BucketStore.open(url, config, create=True)  # another key: not its catalog
    with host_b:  # what the refused init made here is gone with it
        assert not working_path(url).exists()
    with host_a:
        again, created = BucketStore.open(url, config, create=True)
        assert created and again.local.store_id == store.local.store_id
    assert marker in objects(s3_server, url.bucket)


def test_an_encrypted_store_in_a_bucket_holds_ciphertext_and_restores_elsewhere(
    config: BucketConfig, url: BucketUrl, hosts: tuple[Host, Host], s3_server: S3Server
) -> None:
    host_a, host_b = hosts
    rng = np.random.default_rng(13)
    images = [random_image(rng)]
    images.append(mutate(images[0], rng))
    with host_a:
        store, _ = BucketStore.open(url, config, create=True, encrypt=True)
        assert store.local.encrypted
        chain = write_chain(store, images)
        store.push()
        store_id = store.local.store_id or ""
    client = boto3_client(s3_server.endpoint)
    key = f"{url.prefix}/layers/{chain[0]}/pages.bin"
    stored = client.get_object(Bucket=url.bucket, Key=key)["Body"].read()
    page = images[0].pages_of("pc.ram")[images[0].nonzero_pages("pc.ram")[0]].tobytes()
    assert page not in stored  # not in the clear
    share_key(store_id, host_a, host_b)
    with host_b:
        store_b, _ = BucketStore.open(url, config)
        assert store_b.local.encrypted
        assert store_b.fetch(chain[1])[1] == chain
        ram, _prelude, _state = store_b.local.compose(chain[1])
        assert_same_image(ram, images[1])
