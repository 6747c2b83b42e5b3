"""Feature extraction under DDP: two gloo processes on the CPU, shards gathered in dataset order."""

import gc
import socket

import ignite.distributed as idist
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ember.engine import create_evaluator, prepare_model
from ember.handlers.features import FeatureExtractor, extract_features
from ember.models import get_model

LAYERS = ["features", "features.0"]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data():
    # 13 samples over 2 ranks: the DistributedSampler pads rank 1 with sample 0
    gen = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(13, 1, 8, 8, generator=gen), torch.arange(13) % 3)


def _model():
    torch.manual_seed(0)
    return get_model("small_cnn", num_classes=3, in_channels=1, width=4, dropout=0.0).eval()


def _worker(local_rank, folder):
    _extract_and_save(folder)
    # Free the DDP model (and its reducer) while the process group still exists: a
    # gloo reducer destroyed at interpreter exit, after the group, can abort the process.
    gc.collect()


def _extract_and_save(folder):
    model = prepare_model(_model(), device="cpu", parallel="ddp")
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    loader = DataLoader(_data(), batch_size=4, sampler=DistributedSampler(_data(), shuffle=False))
    in_memory = extract_features(model, loader, LAYERS, pool="avg")
    streamed = extract_features(model, loader, "features", pool="avg", output=folder / "streamed")
    evaluator = create_evaluator(model)
    handler = FeatureExtractor(model, "features", pool="avg")
    handler.attach(evaluator)
    evaluator.run(loader)
    torch.save(
        {
            "shard": torch.tensor(list(iter(loader.sampler))),
            "memory": {name: in_memory.features[name] for name in LAYERS},
            "labels": in_memory.labels,
            "indices": in_memory.indices,
            "streamed": torch.from_numpy(np.array(streamed.features["features"])),
            "handler": handler.result.features["features"],
            "handler_indices": handler.result.indices,
        },
        folder / f"rank{idist.get_rank()}.pt",
    )


@pytest.mark.slow
def test_ddp_ranks_get_every_row_once_in_dataset_order(tmp_path):
    with idist.Parallel(
        backend="gloo", nproc_per_node=2, master_addr="127.0.0.1", master_port=_free_port()
    ) as parallel:
        parallel.run(_worker, tmp_path)
    expected = extract_features(_model(), DataLoader(_data(), batch_size=4), LAYERS, pool="avg")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["shard"].tolist() == [0, 2, 4, 6, 8, 10, 12]
    assert ranks[1]["shard"].tolist() == [1, 3, 5, 7, 9, 11, 0]  # padded
    for got in ranks:  # rank 0 and the others get the same, whole result
        for name in LAYERS:
            assert torch.allclose(got["memory"][name], expected.features[name], atol=1e-6)
        assert torch.equal(got["indices"], torch.arange(13))
        assert torch.equal(got["labels"], _data().tensors[1])
        assert torch.allclose(got["streamed"], expected.features["features"], atol=1e-6)
        assert torch.allclose(got["handler"], expected.features["features"], atol=1e-6)
        assert torch.equal(got["handler_indices"], torch.arange(13))
    assert np.array_equal(np.load(tmp_path / "streamed" / "indices.npy"), np.arange(13))
