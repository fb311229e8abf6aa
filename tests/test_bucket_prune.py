"""Prune and delete on a store in an S3 bucket (vmckpt/images/bucketmaint.py), against a
real S3 server (SeaweedFS): a layer removed on one host never comes back from another
host's working copy, its objects go (by the host that removed it, or by any host's gc), two
hosts pruning at once remove each layer once, and every refusal is one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.framework.buckets import Host, share_key
from tests.framework.s3server import S3Server, boto3_client
from tests.test_bucket_store import objects, s3_env, write_chain
from tests.test_images import assert_same_image, content, mutate, random_image
from vmckpt.cli import main
from vmckpt.errors import StoreError
from vmckpt.images import bucketmaint
from vmckpt.images.bucket import BucketConfig, BucketUrl
from vmckpt.images.bucketstore import BucketStore
from vmckpt.images.catalog import CATALOG, Catalog, _mac
from vmckpt.images.format import manifest_bytes
from vmckpt.images.keys import SEAL
from vmckpt.images.maintenance import Result
from vmckpt.images.retention import KeepRules


def layer_objects(s3_server: S3Server, url: BucketUrl, layer_id: str) -> list[str]:
    return [k for k in objects(s3_server, url.bucket) if f"/layers/{layer_id}/" in k]


def raw_catalog(s3_server: S3Server, url: BucketUrl) -> dict[str, object]:
    client = boto3_client(s3_server.endpoint)
    body = client.get_object(Bucket=url.bucket, Key=f"{url.prefix}/catalog.json")["Body"]
    data = json.loads(body.read())
    assert isinstance(data, dict)
    return data


def two_hosts(
    config: BucketConfig, url: BucketUrl, hosts: tuple[Host, Host]
) -> tuple[BucketStore, BucketStore]:
    host_a, host_b = hosts
    with host_a:
        store_a, _ = BucketStore.open(url, config, create=True)
        assert store_a.local.store_id is not None
        share_key(store_a.local.store_id, host_a, host_b)
    with host_b:
        store_b, _ = BucketStore.open(url, config)
    return store_a, store_b


def test_a_deleted_layer_never_comes_back_and_gc_removes_its_objects(
    config: BucketConfig,
    url: BucketUrl,
    hosts: tuple[Host, Host],
    s3_server: S3Server,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host_a, host_b = hosts
    store_a, store_b = two_hosts(config, url, hosts)
    rng = np.random.default_rng(21)
    base = random_image(rng)
    with host_a:
        chain = write_chain(store_a, [base, mutate(base, rng)])
        leaf = store_a.local.write_layer(content(mutate(base, rng), chain[0], base, "s")).id
        store_a.push()
    with host_b:  # host b's working copy holds the leaf and its parent
        assert store_b.fetch(leaf)[1] == [chain[0], leaf]
    with host_a:
        with pytest.raises(StoreError, match="build on it"):
            bucketmaint.delete(store_a, chain[0])  # children stay, so their parent does
        assert layer_objects(s3_server, url, leaf) != []
        dry = bucketmaint.delete(store_a, leaf[:7], dry_run=True)
        assert dry.removed == (leaf,) and leaf in store_a.catalog("test")[0].layers
        result = bucketmaint.delete(store_a, leaf)
        assert result.removed == (leaf,) and result.bytes_freed > 0
        catalog, _ = store_a.catalog("test")
        assert leaf not in catalog.layers and leaf in catalog.removed
        assert layer_objects(s3_server, url, leaf) == []  # deleted by the host that removed it
        assert leaf not in store_a.local.layer_names()
    raw = raw_catalog(s3_server, url)
    assert raw["format_version"] == [1, 6] and leaf in raw["removed"]  # type: ignore[operator]
    with host_b:
        assert store_b.pending() == []  # removed, not "not uploaded"
        assert store_b.push().uploaded == []
        assert layer_objects(s3_server, url, leaf) == []
        assert leaf not in store_b.catalog("test")[0].layers
        with pytest.raises(StoreError, match="removed"):
            store_b.fetch(leaf)  # this host still holds it: refused all the same
        for var, value in s3_env(config).items():
            monkeypatch.setenv(var, value)
        assert main(["list", "--store", str(url)]) == 0
        out = capsys.readouterr().out
        assert "0 not uploaded" in out and "1 removed from the bucket" in out, out
        assert leaf in store_b.trim()
        assert leaf not in store_b.local.layer_names()
    # A removal whose host stopped after the commit: the objects stay until any host's gc.
    with host_a:
        catalog, _ = store_a.catalog("test")
        known = set(catalog.layers)
        assert store_a.remove({chain[1]: catalog.layers[chain[1]][0]}, known, "delete") == [
            chain[1]
        ]
    assert layer_objects(s3_server, url, chain[1]) != []
    with host_b:
        assert store_b.gc(grace_s=3600) == [chain[1]]  # no grace for a removed layer
        assert layer_objects(s3_server, url, chain[1]) == []
        final, _ = store_b.catalog("test")
        assert set(final.layers) == {chain[0]} and set(final.removed) == {leaf, chain[1]}


def test_a_layer_built_on_a_removed_one_is_refused_at_push(
    config: BucketConfig, url: BucketUrl, hosts: tuple[Host, Host], s3_server: S3Server
) -> None:
    host_a, host_b = hosts
    store_a, store_b = two_hosts(config, url, hosts)
    rng = np.random.default_rng(22)
    image = random_image(rng)
    with host_a:
        (layer,) = write_chain(store_a, [image])
        store_a.push()
    with host_b:  # host b builds on it, not uploaded yet
        store_b.fetch(layer)
        child = store_b.local.write_layer(content(mutate(image, rng), layer, image, "c")).id
    with host_a:  # host a cannot see host b's child: the removal commits
        assert bucketmaint.delete(store_a, layer).removed == (layer,)
    with host_b:
        with pytest.raises(StoreError, match=f"builds on {layer}, which was removed"):
            store_b.push()
        assert child in store_b.local.layer_names()  # kept here, nothing lost
        assert layer_objects(s3_server, url, child) == []  # nothing uploaded
        assert child not in store_b.trim()  # not uploaded: trim keeps it and its parent
        assert layer in store_b.local.layer_names()


def race_at_swap(
    monkeypatch: pytest.MonkeyPatch, store: BucketStore, step: str, other: Callable[[], object]
) -> list[object]:
    """Run ``other`` (another host's command) at the moment ``store`` is about to swap the
    bucket's catalog for ``step``, after it read and planned on the catalog: the real
    server then refuses the swap (If-Match), as it does when two hosts race."""
    real_put = store.bucket.put
    ran: list[object] = []

    def put(key: str, data: Any, put_step: str, **kw: Any) -> Any:
        if key == CATALOG and put_step == step and not ran:
            ran.append(other())
        return real_put(key, data, put_step, **kw)

    monkeypatch.setattr(store.bucket, "put", put)
    return ran


def test_two_hosts_prune_at_once_and_each_layer_is_removed_once(
    config: BucketConfig,
    url: BucketUrl,
    hosts: tuple[Host, Host],
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host_a, host_b = hosts
    store_a, store_b = two_hosts(config, url, hosts)
    rng = np.random.default_rng(23)
    with host_a:
        layers = [write_chain(store_a, [random_image(rng)])[0] for _ in range(4)]
        store_a.push()
    with host_b:
        store_b.fetch(layers[0])  # host b holds one of them
    rules = KeepRules(last=2)

    def prune_b() -> Result:
        with host_b:
            return bucketmaint.prune(store_b, rules)

    ran = race_at_swap(monkeypatch, store_a, "prune", prune_b)
    with host_a:
        result_a = bucketmaint.prune(store_a, rules)
        catalog, _ = store_a.catalog("test")
    (result_b,) = ran
    assert isinstance(result_b, Result)
    # Both planned on the same catalog; host b swapped first, host a's swap was refused and
    # it found nothing of its plan left to remove.
    assert len(result_b.removed) == 2 and result_a.removed == ()
    assert set(catalog.layers) == set(layers) - set(result_b.removed)
    assert set(catalog.removed) == set(result_b.removed)
    for layer in result_b.removed:
        assert layer_objects(s3_server, url, layer) == []
    with host_b:
        assert store_b.push().uploaded == []
        assert not set(store_b.local.layer_names()) & set(result_b.removed)


def test_a_layer_named_during_a_removal_refuses_it(
    config: BucketConfig,
    url: BucketUrl,
    hosts: tuple[Host, Host],
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host_a, host_b = hosts
    store_a, store_b = two_hosts(config, url, hosts)
    rng = np.random.default_rng(25)
    image = random_image(rng)
    with host_a:
        (layer,) = write_chain(store_a, [image])
        store_a.push()
    with host_b:
        store_b.fetch(layer)
        child = store_b.local.write_layer(content(mutate(image, rng), layer, image, "c")).id

    def push_b() -> object:
        with host_b:
            return store_b.push()

    ran = race_at_swap(monkeypatch, store_a, "delete", push_b)
    with host_a, pytest.raises(StoreError, match=f"new layer {child} builds on {layer}"):
        bucketmaint.delete(store_a, layer)
    assert len(ran) == 1
    with host_a:
        catalog, _ = store_a.catalog("test")
    assert {layer, child} <= set(catalog.layers) and not catalog.removed
    assert layer_objects(s3_server, url, layer) != []


def test_prune_keeps_what_others_build_on_and_refusals_are_one_line(
    config: BucketConfig,
    url: BucketUrl,
    hosts: tuple[Host, Host],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    host_a, _ = hosts
    for var, value in s3_env(config).items():
        monkeypatch.setenv(var, value)
    store_a, _ = two_hosts(config, url, hosts)
    rng = np.random.default_rng(24)
    base = random_image(rng)
    with host_a:
        chain = write_chain(store_a, [base, mutate(base, rng)])
        store_a.push()
        result = bucketmaint.prune(store_a, KeepRules(last=1), dry_run=True)
        assert result.removed == ()  # the older one is the newer one's parent
        assert result.kept[chain[0]] == bucketmaint.KEPT_CHILDREN
        where = ["--store", str(url)]
        for argv, words in (
            (["delete", *where, chain[0]], "build on it"),
            (["squash", *where, f"{chain[1]}..{chain[0]}"], "not an older layer"),
            (["prune", *where], "--keep"),
            (["delete", *where, "nosuchlayer"], "no layer matches"),
            (["watch", "web", *where, "--keep-last", "2"], "not supported on a store in a bucket"),
        ):
            assert main(argv) != 0, argv
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and words in err, (argv, err)
        assert main(["prune", *where, "--keep-last", "1", "--list"]) == 0
        out = capsys.readouterr().out
        assert f"keep     {chain[0]}  {bucketmaint.KEPT_CHILDREN}" in out
        assert "0 layer(s) removed" in out
        assert main(["delete", *where, chain[1]]) == 0
        assert f"removed  {chain[1]}" in capsys.readouterr().out
        catalog, _ = store_a.catalog("test")
        assert set(catalog.layers) == {chain[0]} and set(catalog.removed) == {chain[1]}
    # A catalog that records removed layers is 1.6: one of 1.5 that does is refused even
    # when it authenticates, and so is a layer both named and removed.
    key = store_a.local.sealing_key("test")
    assert store_a.local.store_id is not None
    for change, words in (
        ({"format_version": [1, 5]}, "1.5 records no removed"),
        ({"removed": {chain[0]: list(catalog.layers[chain[0]])}}, "both named and removed"),
    ):
        body = {**catalog._body(), **change}
        with pytest.raises(StoreError, match=words):
            Catalog.decode(
                manifest_bytes({**body, "mac": _mac(key, body)}), key, store_a.local.store_id
            )


def test_a_fetch_meeting_a_removal_says_so_and_keeps_nothing(
    config: BucketConfig,
    url: BucketUrl,
    hosts: tuple[Host, Host],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host_a, host_b = hosts
    store_a, store_b = two_hosts(config, url, hosts)
    rng = np.random.default_rng(26)
    with host_a:
        (layer,) = write_chain(store_a, [random_image(rng)])
        store_a.push()
    # Host b has read the catalog (it names the layer) and its manifest when host a removes
    # the layer and deletes its objects; host b's download then finds them gone.
    real_get = store_b.bucket.get
    removed: list[Result] = []

    def get(key: str, *args: Any, **kw: Any) -> Any:
        if key.endswith("/" + SEAL) and not removed:
            with host_a:
                removed.append(bucketmaint.delete(store_a, layer))
        return real_get(key, *args, **kw)

    monkeypatch.setattr(store_b.bucket, "get", get)
    with host_b:
        with pytest.raises(StoreError, match=r"removed from bucket .* while this host fetched it"):
            store_b.fetch(layer)
        assert store_b.local.layer_names() == []
        assert [r.removed for r in removed] == [(layer,)]
        with pytest.raises(StoreError, match="removed from bucket"):
            store_b.fetch(layer)  # now refused before anything is fetched


def test_squash_replaces_a_chain_with_a_new_layer_that_restores_the_same(
    config: BucketConfig,
    url: BucketUrl,
    hosts: tuple[Host, Host],
    s3_server: S3Server,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host_a, host_b = hosts
    for var, value in s3_env(config).items():
        monkeypatch.setenv(var, value)
    store_a, store_b = two_hosts(config, url, hosts)
    rng = np.random.default_rng(27)
    images = [random_image(rng)]
    images += [mutate(images[-1], rng) for _ in range(2)]
    with host_a:
        chain = write_chain(store_a, images)
        side = store_a.local.write_layer(content(mutate(images[0], rng), chain[0], images[0], "s"))
        store_a.push()
        where = ["--store", str(url)]
        assert main(["squash", *where, chain[1]]) != 0  # chain[2] builds on it: it stays
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "layers build on it" in err, err
        dry = bucketmaint.squash(store_a, None, chain[2], dry_run=True)
        assert dry.layer is None and set(dry.result.removed) == {chain[1], chain[2]}
        assert set(store_a.catalog("test")[0].layers) == {*chain, side.id}
        assert main(["squash", *where, chain[2]]) == 0
        out = capsys.readouterr().out
        catalog, _ = store_a.catalog("test")
    # chain[0] stays: the side layer builds on it. The new base layer replaces the rest.
    (new,) = set(catalog.layers) - {chain[0], side.id}
    assert f"wrote    {new} (a base layer): it restores as {chain[2]} did" in out, out
    assert set(catalog.removed) == {chain[1], chain[2]}
    for layer in (chain[1], chain[2]):
        assert layer_objects(s3_server, url, layer) == []
    with host_b:
        assert store_b.fetch(new)[1] == [new]  # a base layer: nothing else to fetch
        assert store_b.local.manifest(new).parent is None
        ram, _prelude, _state = store_b.local.compose(new)
        assert_same_image(ram, images[2])
        assert store_b.local.manifest(new).created == store_a.local.manifest(new).created
        with pytest.raises(StoreError, match="removed"):
            store_b.fetch(chain[2])


def test_a_squash_whose_chain_another_host_removes_meanwhile_changes_nothing(
    config: BucketConfig,
    url: BucketUrl,
    hosts: tuple[Host, Host],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host_a, host_b = hosts
    store_a, store_b = two_hosts(config, url, hosts)
    rng = np.random.default_rng(28)
    base = random_image(rng)
    with host_a:
        chain = write_chain(store_a, [base, mutate(base, rng)])
        store_a.push()

    def delete_b() -> Result:
        with host_b:
            return bucketmaint.delete(store_b, chain[1])

    ran = race_at_swap(monkeypatch, store_a, "squash", delete_b)
    with host_a:
        before = set(store_a.local.layer_names())
        with pytest.raises(StoreError, match="removed by another host"):
            bucketmaint.squash(store_a, None, chain[1])
        assert [r.removed for r in ran if isinstance(r, Result)] == [(chain[1],)]
        catalog, _ = store_a.catalog("test")
        assert set(catalog.layers) == {chain[0]}  # no new layer named
        assert set(store_a.local.layer_names()) <= before  # nor kept in the working copy
        assert store_a.pending() == []
