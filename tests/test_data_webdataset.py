"""Webdataset shards: decoding, skip-and-count of bad samples and shards, rank/worker splitting, shuffling."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.webdataset import WebImageCaptionDataset, expand_urls
from tests.test_data_base import natural


def _jpeg(seed: int) -> bytes:
    arr = natural(("astronaut", "chelsea", "coffee")[seed % 3], side=24)
    arr = np.roll(arr, seed, axis=1)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def write_shard(path, keys, bad_image=(), no_image=(), json_caption=()):
    with tarfile.open(path, "w") as tar:
        for key in keys:
            files = {"txt": f"caption {key}".encode()}
            if key in json_caption:
                files = {"json": json.dumps({"caption": f"json {key}"}).encode()}
            if key in bad_image:
                files["jpg"] = b"\xff\xd8 not really a jpeg"
            elif key not in no_image:
                files["jpg"] = _jpeg(int(key[-3:]))
            for ext, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def shards(tmp_path, n_shards=4, per_shard=5):
    keys = []
    for s in range(n_shards):
        ks = [f"s{s}_{i:03d}" for i in range(per_shard)]
        write_shard(tmp_path / f"shard-{s:03d}.tar", ks)
        keys += ks
    return str(tmp_path / f"shard-{{000..{n_shards - 1:03d}}}.tar"), keys


def test_brace_expansion_and_missing_shards(tmp_path):
    assert expand_urls("a-{00..02}.tar::b.tar") == ["a-00.tar", "a-01.tar", "a-02.tar", "b.tar"]
    with pytest.raises(FileNotFoundError, match="shard-000.tar"):
        WebImageCaptionDataset(str(tmp_path / "shard-{000..001}.tar"))


def test_items_and_bad_samples_and_truncated_shard(tmp_path):
    write_shard(tmp_path / "a.tar", ["k000", "k001", "k002", "k003", "k004"], bad_image={"k001"},
                no_image={"k003"}, json_caption={"k004"})
    full = tmp_path / "full.tar"
    write_shard(full, [f"t{i:03d}" for i in range(6)])
    (tmp_path / "b.tar").write_bytes(full.read_bytes()[:9000])  # truncated in the middle
    ds = WebImageCaptionDataset([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], size=16)
    items = list(ds)
    keys = [it["__key__"] for it in items]
    assert keys[:3] == ["k000", "k002", "k004"] and ds.skipped == 2 and ds.skipped_shards == 1
    assert 1 <= len(keys) - 3 < 6 and all(k.startswith("t") for k in keys[3:])
    assert items[0]["caption"] == "caption k000" and items[2]["caption"] == "json k004"
    for it in items:
        assert it["image"].shape == (16, 16, 3) and it["image"].dtype == np.float32
        assert -1 <= it["image"].min() <= it["image"].max() <= 1


@pytest.mark.parametrize("n_shards", [4, 1])  # by shard, and by sample when shards < consumers
def test_ranks_split_the_stream_disjointly_and_completely(tmp_path, monkeypatch, n_shards):
    urls, keys = shards(tmp_path, n_shards=n_shards)
    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        seen.append([it["__key__"] for it in WebImageCaptionDataset(urls, size=8)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(keys)
    assert abs(len(seen[0]) - len(seen[1])) <= 5


def test_dataloader_workers_split_the_shards(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    urls, keys = shards(tmp_path, n_shards=4, per_shard=3)
    loader = torch.utils.data.DataLoader(WebImageCaptionDataset(urls, size=8), batch_size=None, num_workers=2)
    got = [item["__key__"] for item in loader]
    assert sorted(got) == sorted(keys) and len(set(got)) == len(keys)


def test_seeded_shuffle_is_a_reproducible_permutation(tmp_path):
    urls, keys = shards(tmp_path, n_shards=3, per_shard=6)
    order = lambda ds: [it["__key__"] for it in ds]  # noqa: E731
    a = order(WebImageCaptionDataset(urls, size=8, shuffle_buffer=8, seed=1))
    b = order(WebImageCaptionDataset(urls, size=8, shuffle_buffer=8, seed=1))
    assert a == b and sorted(a) == sorted(keys) and a != keys
    ds = WebImageCaptionDataset(urls, size=8, shuffle_buffer=8, seed=1)
    ds.set_epoch(1)
    assert order(ds) != a


def test_torch_distributed_takes_precedence_over_the_environment(tmp_path, monkeypatch):
    import torch.distributed as dist

    from ldm.data.webdataset import rank_and_world_size

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world_size() == (3, 4)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert rank_and_world_size() == (0, 1)
    finally:
        dist.destroy_process_group()
