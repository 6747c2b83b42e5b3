from pathlib import Path

import pytest
import yaml

from ember.config import Config, config_to_dict, load_config
from ember.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_default_is_the_digits_experiment():
    config = load_config()
    assert config == Config()
    assert (config.model.name, config.data.name) == ("small_cnn", "digits")
    assert (config.optimizer.name, config.optimizer.weight_decay) == ("adam", 4e-4)


def test_configs_digits_yaml_spells_out_the_default():
    assert load_config(REPO / "configs" / "digits.yaml") == Config()


@pytest.mark.parametrize("name", ["digits", "shapes_alexnet", "cifar10_resnet18", "multi_gpu_dp"])
def test_shipped_configs_load(name):
    load_config(REPO / "configs" / f"{name}.yaml")


def test_overrides_are_typed():
    config = load_config(None, [
        "trainer.max_epochs=3", "trainer.device_ids=[0,1]", "trainer.amp=bf16",
        "data.root=null", "optimizer.lr=0.01", "model.kwargs.dropout=0.3", "data.options.length=100",
    ])
    assert config.trainer.max_epochs == 3 and config.trainer.device_ids == [0, 1]
    assert config.trainer.amp == "bf16" and config.optimizer.lr == 0.01
    assert config.model.kwargs == {"dropout": 0.3} and config.data.options == {"length": 100}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: mine\ntrainer: {max_epochs: 4}\n")
    config = load_config(path, ["trainer.max_epochs=6"])
    assert config.name == "mine" and config.trainer.max_epochs == 6


def test_dict_source_and_roundtrip():
    config = load_config({"seed": 3, "trainer": {"amp": "fp16"}})
    plain = config_to_dict(config)
    assert plain["seed"] == 3 and plain["trainer"]["amp"] == "fp16"
    assert load_config(plain) == config
    yaml.safe_dump(plain)  # plain data only


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_epoch=3"], r"Unknown config key 'trainer.max_epoch' \(command line\). Did you mean 'trainer.max_epochs'\?"),
        (["trainr.max_epochs=3"], r"Unknown config key 'trainr'.*Did you mean 'trainer'\?"),
        (["trainer.max_epochs=abc"], r"Invalid value for config key 'trainer.max_epochs'.*'abc'"),
        (["seed=true"], r"Invalid value for config key 'seed'"),
        (["optimizer.lr=0"], r"'optimizer.lr' should be a positive number, got 0.0"),
        (["optimizer.lr=-1e-3"], r"'optimizer.lr' should be a positive number"),
        (["data.batch_size=0"], r"'data.batch_size' should be at least 1, got 0"),
        (["trainer.max_epochs=0"], r"'trainer.max_epochs' should be at least 1, got 0"),
        (["optimizer.name=adamm"], r"'optimizer.name' should be one of adam, adamw, sgd, got 'adamm'. Did you mean 'adam'\?"),
        (["scheduler.name=cosin"], r"'scheduler.name' should be one of .*Did you mean 'cosine'\?"),
        (["trainer.amp=fp8"], r"'trainer.amp' should be one of null, bf16, fp16, got 'fp8'"),
        (["trainer.parallel=pipe"], r"'trainer.parallel' should be one of auto, none, dp, ddp"),
        (["trainer.device_ids=[]"], r"'trainer.device_ids' should be a non-empty list"),
        (["features.split=dev"], r"'features.split' should be one of train, val, test, got 'dev'"),
        (["distributed.backend=mpi"], r"'distributed.backend' should be one of null, gloo, nccl, got 'mpi'"),
        (["name=a/b"], r"'name' should be a non-empty run name without '/'"),
        (["trainer=3"], r"Invalid config \(command line\)"),
        (["max_epochs"], r"Override 'max_epochs' should be written key=value"),
        (["trainer.device_ids=[0]", "trainer.device_ids.x=1"], r"Invalid override 'trainer.device_ids.x=1'"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="Config file '.*missing.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrainer: {max_epochs: 3\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error in '.*bad.yaml' at line \d+"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="should hold a mapping of sections .* got a YAML list"):
        load_config(listed)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("modle: {name: alexnet}\n")
    with pytest.raises(ConfigError, match=r"Unknown config key 'modle' \(file .*\). Did you mean 'model'\?"):
        load_config(unknown)
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"\x80\x02\xff\xfe\x00")
    with pytest.raises(ConfigError, match="is not a text \\(YAML\\) file"):
        load_config(binary)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_yaml_is_read_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    evil.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_config(evil)
    assert not marker.exists()
