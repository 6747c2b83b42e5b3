"""Feature rows: streamed to disk, saved, loaded, exported to TensorBoard; nothing overwritten."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ember.errors import ConfigError, EmberError
from ember.handlers.feature_sink import FeatureSink, sampler_indices
from ember.handlers.feature_store import FeatureResult, export_projector
from ember.handlers.features import extract_features


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(108, 4)).eval()


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(11, 1, 8, 8, generator=gen), torch.arange(11) % 4)


def _loader(data, batch_size=4):
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _expected(model, data):
    with torch.no_grad():
        return model[0](data.tensors[0])


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_streamed_rows_equal_in_memory_rows(tmp_path, data):
    model = _model()
    out = tmp_path / "feats"
    streamed = extract_features(model, _loader(data), ["0", "2"], output=out)
    in_memory = extract_features(model, _loader(data), ["0", "2"])
    assert sorted(p.name for p in out.iterdir()) == ["0.npy", "2.npy", "features.json", "indices.npy", "labels.npy"]
    assert isinstance(streamed.features["0"], np.memmap) and streamed.path == out
    assert np.array_equal(streamed.features["0"], _expected(model, data).numpy())
    assert np.array_equal(streamed.features["2"], in_memory.features["2"].numpy())
    assert np.array_equal(np.load(out / "labels.npy"), data.tensors[1].numpy())
    assert np.array_equal(np.load(out / "indices.npy"), np.arange(11))
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    loaded = FeatureResult.load(out)
    assert loaded.layers == ["0", "2"] and loaded.meta["pool"] is None


def test_output_whose_parent_is_missing_is_refused(tmp_path, data):
    with pytest.raises(ConfigError, match=r"Argument `output`: folder '.*missing' does not exist; create it first"):
        extract_features(_model(), _loader(data), "0", output=tmp_path / "missing" / "feats")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", ["file", "folder"])
def test_existing_output_is_left_byte_for_byte(tmp_path, data, existing):
    out = tmp_path / "feats"
    if existing == "file":
        out.write_bytes(b"precious \x00 bytes")
        before = out.read_bytes()
    else:
        out.mkdir()
        (out / "0.npy").write_bytes(b"old rows")
        before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"'.*feats' already exists; pass overwrite=True to replace it"):
        extract_features(_model(), _loader(data), "0", output=out)
    assert (out.read_bytes() if existing == "file" else _snapshot(out)) == before
    result = extract_features(_model(), _loader(data), "0", output=out, overwrite=True)
    assert out.is_dir() and np.array_equal(result.features["0"], _expected(_model(), data).numpy())


class _FailingAt(torch.utils.data.Dataset):
    def __init__(self, data, bad):
        self.data, self.bad = data, bad

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        if index == self.bad:
            raise RuntimeError("disk on fire")
        return self.data[index]


def test_failed_run_keeps_the_old_output(tmp_path, data):
    out = tmp_path / "feats"
    extract_features(_model(), _loader(data), "0", output=out)
    before = _snapshot(out)
    with pytest.raises(RuntimeError, match="disk on fire"):
        extract_features(_model(), _loader(_FailingAt(data, 9)), "0", output=out, overwrite=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats"]


def test_save_and_load_pt_and_npy(tmp_path, data):
    result = extract_features(_model(), _loader(data), ["0", "3"], pool="flatten")
    pt = result.save(tmp_path / "f.pt")
    raw = torch.load(pt, weights_only=True)
    assert raw["layers"] == ["0", "3"] and torch.equal(raw["features"]["0"], result.features["0"])
    assert torch.equal(raw["labels"], data.tensors[1]) and torch.equal(raw["indices"], torch.arange(11))
    folder = result.save(tmp_path / "f.npy")
    assert np.array_equal(np.load(folder / "3.npy"), result.features["3"].numpy())
    for loaded in (FeatureResult.load(pt), FeatureResult.load(folder)):
        assert loaded.layers == ["0", "3"] and len(loaded) == 11
        assert np.array_equal(np.asarray(loaded.features["0"]), result.features["0"].numpy())
    # a streamed (memmap) result saves to .pt as plain tensors
    streamed = FeatureResult.load(folder)
    assert torch.equal(torch.load(streamed.save(tmp_path / "g.pt"), weights_only=True)["features"]["3"],
                       result.features["3"])


def test_save_refuses_existing_paths_and_unknown_suffixes(tmp_path, data):
    result = extract_features(_model(), _loader(data), "0")
    target = tmp_path / "f.pt"
    target.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match=r"Argument `path`: '.*f.pt' already exists; pass overwrite=True"):
        result.save(target)
    assert target.read_bytes() == b"keep me"
    result.save(target, overwrite=True)
    assert torch.load(target, weights_only=True)["layers"] == ["0"]
    with pytest.raises(ConfigError, match=r"Argument `path` should end in .pt, .pth or .npy"):
        result.save(tmp_path / "f.csv")
    with pytest.raises(ConfigError, match=r"Argument `path`: folder '.*nowhere' does not exist"):
        result.save(tmp_path / "nowhere" / "f.pt")
    with pytest.raises(EmberError, match="No features at"):
        FeatureResult.load(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(EmberError, match="'.*junk.pt' is not a features file saved by FeatureResult.save"):
        FeatureResult.load(tmp_path / "junk.pt")


@pytest.mark.parametrize("output", [False, True])
def test_sink_puts_rows_in_dataset_order_and_drops_padding(tmp_path, output):
    # the order a DistributedSampler shard or any known order may give, with a repeat
    sink = FeatureSink(["x"], output=tmp_path / "s" if output else None)
    order = [3, 1, 4, 0, 2, 1]
    sink.start(order)
    for start in (0, 4):
        idx = torch.tensor(order[start : start + 4])
        sink.write({"x": idx[:, None].float() * 10}, idx + 100)
    result = sink.finish()
    assert np.array_equal(np.asarray(result.indices), [0, 1, 2, 3, 4])
    assert np.array_equal(np.asarray(result.features["x"])[:, 0], [0, 10, 20, 30, 40])
    assert np.array_equal(np.asarray(result.labels), [100, 101, 102, 103, 104])


def test_sink_refuses_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="Layer name 'labels' is reserved for the labels.npy file"):
        FeatureSink(["labels"])
    sink = FeatureSink(["x"], output=tmp_path / "s")
    sink.start(range(6))
    with pytest.raises(EmberError, match="Layer 'x' gave 3 rows for a batch of 4 samples"):
        sink.write({"x": torch.zeros(3, 2)}, torch.zeros(4))
    sink.write({"x": torch.zeros(4, 2)}, torch.zeros(4))
    with pytest.raises(EmberError, match="stopped early: 2 of 6 rows were never computed"):
        sink.finish()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="The loader yields no samples"):
        FeatureSink(["x"]).start([])


def test_sampler_indices_follow_the_sampler():
    data = TensorDataset(torch.zeros(10, 1))
    assert sampler_indices(DataLoader(data, batch_size=4)).tolist() == list(range(10))
    assert sampler_indices(DataLoader(data, batch_size=4, drop_last=True)).tolist() == list(range(8))
    assert sampler_indices(DataLoader(data, batch_size=4), max_batches=1).tolist() == [0, 1, 2, 3]
    shard = DistributedSampler(data, num_replicas=3, rank=1, shuffle=False)
    assert sampler_indices(DataLoader(data, batch_size=2, sampler=shard)).tolist() == [1, 4, 7, 0]


def _projector_files(log_dir, tag):
    folder = log_dir / "00000" / tag
    rows = [line.split("\t") for line in (folder / "tensors.tsv").read_text().splitlines()]
    meta = [line.split("\t") for line in (folder / "metadata.tsv").read_text().splitlines()]
    return folder, np.array(rows, dtype=np.float32), meta


def test_export_projector_writes_embedding_metadata_and_sprite(tmp_path, data):
    result = extract_features(_model(), _loader(data), ["0", "3"], pool="avg")
    log_dir = tmp_path / "tb"
    folder = export_projector(
        result, log_dir, layer="0", images=data, class_names=["a", "b", "c", "d"], max_points=6
    )
    folder, rows, meta = _projector_files(log_dir, "0")
    picked = [0, 2, 4, 6, 8, 10]
    assert np.allclose(rows, result.features["0"].numpy()[picked], atol=1e-5)
    assert meta[0] == ["index", "label", "class"]
    assert meta[1:] == [[str(i), str(i % 4), "abcd"[i % 4]] for i in picked]
    assert (folder / "sprite.png").is_file()
    config = (log_dir / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "0:00000"' in config and "00000/0/metadata.tsv" in config
    assert "00000/0/sprite.png" in config and "single_image_dim: 8" in config
    # a second export keeps the first in the projector config
    export_projector(result, log_dir, layer="3", images=data.tensors[0])
    config = (log_dir / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "0:00000"' in config and 'tensor_name: "3:00000"' in config
    _, rows, meta = _projector_files(log_dir, "3")
    assert rows.shape == (11, 4) and meta[0] == ["index", "label"]


def test_export_projector_refuses_bad_input(tmp_path, data):
    result = extract_features(_model(), _loader(data), ["0", "3"])
    log_dir = tmp_path / "tb"
    with pytest.raises(ConfigError, match=r"Argument `layer` should be one of '0', '3', got None"):
        export_projector(result, log_dir)
    with pytest.raises(ConfigError, match=r"Label 2 has no name: `class_names` lists 2 classes"):
        export_projector(result, log_dir, layer="3", class_names=["a", "b"])
    with pytest.raises(ConfigError, match=r"Argument `images` should give \(C, H, W\) tensors"):
        export_projector(result, log_dir, layer="3", images=torch.zeros(11, 8, 8))
    with pytest.raises(ConfigError, match="Argument `max_points` should be a positive integer, got 0"):
        export_projector(result, log_dir, layer="3", max_points=0)
    export_projector(result, log_dir, layer="3")
    before = _snapshot(log_dir / "00000")
    with pytest.raises(ConfigError, match="An embedding '3' already exists in .*; pass overwrite=True"):
        export_projector(result, log_dir, layer="3")
    assert _snapshot(log_dir / "00000") == before
    export_projector(result, log_dir, layer="3", overwrite=True, max_points=3)
    assert _projector_files(log_dir, "3")[1].shape == (3, 4)
