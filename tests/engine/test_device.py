import pytest
import torch
from torch import nn

from ember import DeviceError, prepare_model, resolve_device, unwrap_model
from ember.errors import ConfigError
from ember.models import get_model

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU errors")


def test_auto_is_cuda0_or_cpu():
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device(None) == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu")


@needs_no_gpu
def test_cuda_without_gpu_says_what_exists():
    with pytest.raises(DeviceError, match="this machine has no CUDA GPU; use device='cpu'"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="'cuda:1' was asked for"):
        resolve_device("cuda:1")


def test_unknown_device():
    with pytest.raises(DeviceError, match="Unknown device 'gpu0'"):
        resolve_device("gpu0")


@needs_no_gpu
def test_dp_with_device_ids_and_no_gpus():
    with pytest.raises(DeviceError, match=r"device_ids=\[0, 1\].*no CUDA GPU"):
        prepare_model(nn.Linear(2, 2), parallel="dp", device_ids=[0, 1])


@pytest.mark.gpu
def test_device_ids_beyond_count():
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=rf"device_ids \[{count}\] do not exist"):
        prepare_model(nn.Linear(2, 2), parallel="dp", device_ids=[count])


def test_unknown_parallel_mode():
    with pytest.raises(ConfigError, match="`parallel` should be one of auto, none, dp, ddp, got 'pipe'"):
        prepare_model(nn.Linear(2, 2), parallel="pipe")


def test_ddp_without_process_group():
    with pytest.raises(DeviceError, match="parallel='ddp' needs a running process group"):
        prepare_model(nn.Linear(2, 2), parallel="ddp")


def test_not_a_module():
    with pytest.raises(ConfigError, match="`model` should be a torch.nn.Module, got str"):
        prepare_model("resnet18")


def test_device_ids_need_dp():
    with pytest.raises(ConfigError, match="`device_ids` is only used with parallel='dp'"):
        prepare_model(nn.Linear(2, 2), parallel="none", device_ids=[0])


def test_prepare_none_and_dp():
    model = nn.Linear(2, 2)
    assert prepare_model(model, parallel="none") is model
    wrapped = prepare_model(nn.Linear(2, 2), parallel="dp")
    assert isinstance(wrapped, nn.DataParallel)
    if not torch.cuda.is_available():
        # "auto" on one process without GPUs: no wrapping
        assert not isinstance(prepare_model(nn.Linear(2, 2)), nn.DataParallel)


def test_unwrap_any_nesting():
    model = get_model("small_cnn", num_classes=3, in_channels=1)
    assert unwrap_model(model) is model
    assert unwrap_model(nn.DataParallel(model)) is model
    assert unwrap_model(nn.DataParallel(nn.DataParallel(model))) is model
    compiled = torch.compile(nn.DataParallel(model))
    assert unwrap_model(compiled) is model
    assert unwrap_model(nn.DataParallel(torch.compile(model))) is model
    keys = unwrap_model(compiled).state_dict().keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)


def test_unwrap_ddp(tmp_path):
    import ignite.distributed as idist
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    idist.set_local_rank(0)
    try:
        model = nn.Linear(2, 2)
        ddp = prepare_model(model, parallel="auto")
        assert isinstance(ddp, nn.parallel.DistributedDataParallel)
        assert unwrap_model(torch.compile(ddp)) is model
    finally:
        idist.finalize()  # also resets ignite's view of the process group


def test_ddp_sync_batchnorm_option(tmp_path):
    import ignite.distributed as idist
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    idist.set_local_rank(0)
    try:
        model = get_model("small_cnn", num_classes=3, in_channels=1)
        if not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="sync_batchnorm=True needs CUDA GPUs"):
                prepare_model(model, parallel="ddp", sync_batchnorm=True)
            return
        ddp = prepare_model(model, parallel="ddp", sync_batchnorm=True)
        norms = [m for m in unwrap_model(ddp).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    finally:
        idist.finalize()
