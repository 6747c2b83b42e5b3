"""Every mistake a user makes gives one clear `error:` line, the right exit code, and harms nothing.

One real run is trained once (module fixture). Each mistake then runs against a fresh
copy of its output folder through ``ember.cli.main``, and must: exit 2 (usage or
config) or 1 (runtime); print exactly one ``error:`` line naming the key, path or value
that is wrong, and no traceback; create no run folder; and leave every file of the
earlier run, and every input file, byte for byte as it was.
"""

from __future__ import annotations

import ast
import functools
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _cli_helpers import FAST, assert_clean_error, cli, run_dirs, tree_hashes
from PIL import Image

from ember.config import load_config
from ember.errors import ConfigError

EMBER = Path(__file__).resolve().parents[1] / "ember"
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")


def _images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


class _RunsCode:
    """Unpickling this runs os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _make_inputs(a: Path, run: Path) -> None:
    """The files the mistakes point at: bad configs, damaged checkpoints, image folders."""
    (a / "bad.yaml").write_text("model:\n  name: small_cnn\ntrainer: {max_epochs: 2\n")
    (a / "list.yaml").write_text("- model\n- data\n")
    (a / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    (a / "tag.yaml").write_text(f"name: !!python/object/apply:os.system ['touch {a / 'yaml-ran'}']\n")
    (a / "typo.yaml").write_text("trainer:\n  max_epoch: 3\n")
    (a / "a_file").write_text("not a folder\n")
    (a / "existing.pt").write_bytes(b"features of an earlier extraction")
    (a / "notes.pt").write_text("my notes, not a checkpoint\n")
    best = next((run / "checkpoints").glob("best_*.pt"))
    good = best.read_bytes()
    (a / "truncated.pt").write_bytes(good[: len(good) // 2])
    damaged = bytearray(good)
    damaged[len(damaged) // 2 : len(damaged) // 2 + 256] = bytes(256)  # inside the tensor data
    (a / "damaged.pt").write_bytes(bytes(damaged))
    checkpoint = torch.load(best, weights_only=True)
    checkpoint["model_spec"] = {**checkpoint["model_spec"], "name": "alexnet"}
    torch.save(checkpoint, a / "other_model.pt")
    torch.save({"model": _RunsCode(a / "pickle-ran"), "config": {}}, a / "evil.pt")
    (a / "evil_legacy.pt").write_bytes(pickle.dumps({"model": _RunsCode(a / "pickle-ran")}, protocol=2))
    (a / "not_a_run" / "checkpoints").mkdir(parents=True)
    (a / "empty_images" / "cat").mkdir(parents=True)
    (a / "empty_images" / "dog").mkdir()
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        for label in ("cat", "dog"):
            _images(a / "corrupt_images" / split / label, count, seed=count + len(label))
    (a / "corrupt_images" / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One finished run (its output folder kept pristine) and the inputs of the mistakes."""
    base = tmp_path_factory.mktemp("bad_input")
    pristine = base / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        from ember.cli import main

        assert main(["train", f"output_dir={pristine}", *FAST]) == 0
    (run,) = run_dirs(pristine)
    inputs = base / "inputs"
    inputs.mkdir()
    _make_inputs(inputs, run)
    return SimpleNamespace(pristine=pristine, run_rel=run.relative_to(pristine),
                           hashes=tree_hashes(pristine), inputs=inputs, input_hashes=tree_hashes(inputs))


@pytest.fixture
def w(world, tmp_path, monkeypatch):
    """A fresh copy of the finished run's output folder for one mistake (cwd: an empty folder)."""
    out = tmp_path / "runs"
    shutil.copytree(world.pristine, out)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return SimpleNamespace(out=out, run=out / world.run_rel, a=world.inputs, tmp=tmp_path, cwd=work)


def _train(w, *overrides):
    return ["train", f"output_dir={w.out}", *FAST, *overrides]


# (id, argv from the workspace, exit code, regex the error line must match)
CONFIG_MISTAKES = [
    ("unknown-key", lambda w: _train(w, "trainer.max_epoch=1"), 2,
     r"^error: Unknown config key 'trainer\.max_epoch' \(command line\)\. Did you mean 'trainer\.max_epochs'\?$"),
    ("misspelt-section", lambda w: _train(w, "optimiser.lr=0.1"), 2,
     r"Unknown config key 'optimiser' \(command line\)\. Did you mean 'optimizer'\?"),
    ("wrong-type", lambda w: _train(w, "trainer.max_epochs=ten"), 2,
     r"Invalid value for config key 'trainer\.max_epochs' \(command line\): Value 'ten' .* Integer"),
    ("wrong-type-bool", lambda w: _train(w, "tensorboard.enabled=maybe"), 2,
     r"config key 'tensorboard\.enabled'.*'maybe' is not a valid bool"),
    ("lr-zero", lambda w: _train(w, "optimizer.lr=0"), 2,
     r"Config key 'optimizer\.lr' should be a positive number, got 0\.0"),
    ("lr-negative", lambda w: _train(w, "optimizer.lr=-0.1"), 2,
     r"Config key 'optimizer\.lr' should be a positive number, got -0\.1"),
    ("batch-size-zero", lambda w: _train(w, "data.batch_size=0"), 2,
     r"Config key 'data\.batch_size' should be at least 1, got 0"),
    ("max-epochs-zero", lambda w: _train(w, "trainer.max_epochs=0"), 2,
     r"Config key 'trainer\.max_epochs' should be at least 1, got 0"),
    ("num-workers-negative", lambda w: _train(w, "data.num_workers=-1"), 2,
     r"Config key 'data\.num_workers' should be at least 0, got -1"),
    ("unknown-model", lambda w: _train(w, "model.name=resnet9000"), 2,
     r"Unknown model 'resnet9000'\. Did you mean 'resnet\d+'.*`ember models` lists"),
    ("unknown-dataset", lambda w: _train(w, "data.name=imagenet22k"), 2,
     r"Unknown data set 'imagenet22k'; expected one of cifar10, .*digits"),
    ("unknown-optimizer", lambda w: _train(w, "optimizer.name=lion"), 2,
     r"Config key 'optimizer\.name' should be one of adam, adamw, sgd, got 'lion'"),
    ("unknown-scheduler", lambda w: _train(w, "scheduler.name=onecycle"), 2,
     r"Config key 'scheduler\.name' should be one of none, step, .*got 'onecycle'"),
    ("amp-fp8", lambda w: _train(w, "trainer.amp=fp8"), 2,
     r"Config key 'trainer\.amp' should be one of null, bf16, fp16, got 'fp8'"),
    ("checkpoint-metric-f1", lambda w: _train(w, "checkpoint.metric=f1"), 2,
     r"Config key 'checkpoint\.metric' should be one of accuracy, loss, got 'f1'"),
    ("backend-mpi", lambda w: _train(w, "distributed.backend=mpi"), 2,
     r"Config key 'distributed\.backend' should be one of null, gloo, nccl, got 'mpi'"),
    ("device-ids-empty", lambda w: _train(w, "trainer.device_ids=[]"), 2,
     r"Config key 'trainer\.device_ids' should be a non-empty list of GPU ids or null, got \[\]"),
    ("dp-with-processes", lambda w: _train(w, "trainer.parallel=dp", "distributed.nproc_per_node=2"), 2,
     r"trainer\.parallel=dp is the single-process multi-GPU mode"),
    ("override-without-equals", lambda w: _train(w, "foo"), 2,
     r"Override 'foo' should be written key=value \(e\.g\. trainer\.max_epochs=5\)"),
    ("override-bad-yaml-value", lambda w: _train(w, "trainer.device_ids=[0,"), 2,
     r"Override 'trainer\.device_ids=\[0,': its value is not valid YAML"),
    ("override-empty-key-part", lambda w: _train(w, "trainer..max_epochs=2"), 2,
     r"Override 'trainer\.\.max_epochs=2': key 'trainer\.\.max_epochs' has an empty part"),
    ("section-given-a-value", lambda w: _train(w, "model=alexnet"), 2,
     r"config key 'model' is a section \(name, .*\), not a value; got 'alexnet'.*Did you mean model\.name=alexnet\?"),
    ("empty-name", lambda w: _train(w, "name="), 2,
     r"config key 'name' \(command line\): it cannot be null"),
    ("name-escapes-output-dir", lambda w: _train(w, "name=../../x"), 2,
     r"Config key 'name' should be a non-empty run name without '/'.*got '\.\./\.\./x'"),
    ("model-unknown-argument", lambda w: _train(w, "model.kwargs={depth: 3}"), 2,
     r"Model 'small_cnn' does not take these arguments: .*'depth'"),
    ("model-bad-argument", lambda w: _train(w, "model.kwargs={width: -1}"), 2,
     r"Model 'small_cnn' could not be built with \{'width': -1\}"),
    ("unknown-data-option", lambda w: _train(w, "data.options={colour: 1}"), 2,
     r"data set 'digits' has no option\(s\) colour"),
    ("config-missing", lambda w: ["train", w.a / "missing.yaml", f"output_dir={w.out}"], 2,
     r"Config file '.*missing\.yaml' does not exist"),
    ("config-not-yaml", lambda w: ["train", w.a / "binary.yaml", f"output_dir={w.out}"], 2,
     r"Config file '.*binary\.yaml' is not a text \(YAML\) file"),
    ("config-is-a-folder", lambda w: ["train", w.a, f"output_dir={w.out}"], 2,
     r"Config file '.*inputs' is a folder; give a YAML file"),
    ("yaml-syntax-error", lambda w: ["train", w.a / "bad.yaml", f"output_dir={w.out}"], 2,
     r"YAML syntax error in '.*bad\.yaml' at line 4, column 1"),
    ("yaml-list", lambda w: ["train", w.a / "list.yaml", f"output_dir={w.out}"], 2,
     r"Config file '.*list\.yaml' should hold a mapping of sections .*got a YAML list"),
    ("yaml-python-tag", lambda w: ["train", w.a / "tag.yaml", f"output_dir={w.out}"], 2,
     r"tag\.yaml' at line 1.*could not determine a constructor for the tag '.*python/object/apply:os\.system'"),
    ("yaml-unknown-key", lambda w: ["train", w.a / "typo.yaml", f"output_dir={w.out}"], 2,
     r"Unknown config key 'trainer\.max_epoch' \(file '.*typo\.yaml'\)\. Did you mean 'trainer\.max_epochs'\?"),
    ("output-dir-is-a-file", lambda w: _train(w, f"output_dir={w.a / 'a_file'}"), 2,
     r"output_dir '.*a_file' is a file, not a folder"),
    ("output-dir-under-a-file", lambda w: _train(w, f"output_dir={w.a / 'a_file' / 'runs'}"), 2,
     r"output_dir '.*a_file/runs' cannot be created: '.*a_file' is a file, not a folder"),
    ("resume-with-a-config-file", lambda w: ["train", w.a / "typo.yaml", "--resume", w.run], 2,
     r"--resume continues the run with its own config; got a CONFIG file '.*typo\.yaml'"),
    ("resume-changing-the-model", lambda w: ["train", "--resume", w.run, "model.name=alexnet",
                                             "trainer.max_epochs=2"], 2,
     r"Resuming with a config that changes the model is refused: model was \{'name': 'small_cnn'"),
    ("resume-a-finished-run", lambda w: ["train", "--resume", w.run], 2,
     r"already finished: epoch 1 of trainer\.max_epochs=1\. To train longer, resume with trainer\.max_epochs="),
    ("evaluate-unknown-split", lambda w: ["evaluate", w.run, "--split", "validation"], 2,
     r"Unknown split 'validation': expected one of train, val, test"),
    ("evaluate-unknown-override", lambda w: ["evaluate", w.run, "data.nope=1"], 2,
     r"Unknown config key 'data\.nope' \(command line\)"),
    ("extract-unknown-layer", lambda w: ["extract", w.run, "--layer", "nope", "--output", w.tmp / "f.pt"], 2,
     r"Layer 'nope' is not a sub-module of SmallCNN\. Closest: 'features'"),
    ("extract-unknown-split", lambda w: ["extract", w.run, "--layer", "features", "--split", "tset",
                                         "--output", w.tmp / "f.pt"], 2,
     r"Unknown split 'tset'"),
    ("extract-over-existing-file", lambda w: ["extract", w.run, "--layer", "features",
                                              "--output", w.a / "existing.pt"], 2,
     r"Argument `output`: '.*existing\.pt' already exists; pass overwrite=True"),
    ("extract-into-missing-folder", lambda w: ["extract", w.run, "--layer", "features",
                                               "--output", w.tmp / "nope" / "f.pt"], 2,
     r"Argument `output`: folder '.*nope' does not exist; create it first"),
    ("unknown-command", lambda w: ["fly"], 2,
     r"^error: argument COMMAND: invalid choice: 'fly' \(choose from 'train', "),
    ("extract-without-layer", lambda w: ["extract", w.run, "--output", w.tmp / "f.pt"], 2,
     r"^error: the following arguments are required: --layer \(`ember extract --help` shows the options\)"),
    ("extract-unknown-pool", lambda w: ["extract", w.run, "--layer", "features", "--pool", "max",
                                        "--output", w.tmp / "f.pt"], 2,
     r"argument --pool: invalid choice: 'max'"),
    pytest.param(
        "train-unknown-features-layer", lambda w: _train(w, "features.layer=nope"), 2,
        r"Layer 'nope' is not a sub-module of SmallCNN",
        id="train-unknown-features-layer",
    ),
]

RUNTIME_MISTAKES = [
    ("num-classes-below-labels", lambda w: _train(w, "model.num_classes=5"), 1,
     r"data set 'digits' has 10 classes but model\.num_classes is 5; set model\.num_classes to at least 10"),
    ("data-root-missing", lambda w: _train(w, "data.name=cifar10", f"data.root={w.tmp / 'nope'}"), 1,
     r"data set 'cifar10' not found under .*nope \(looked in .*cifar-10-batches-py\): set data\.download=true"),
    ("imagefolder-without-root", lambda w: _train(w, "data.name=imagefolder"), 1,
     r"data set 'imagefolder' needs a folder: set data\.root to it"),
    ("imagefolder-empty", lambda w: _train(w, "data.name=imagefolder", f"data.root={w.a / 'empty_images'}"), 1,
     r"image folder .*empty_images: Found no valid file for the classes cat, dog"),
    ("imagefolder-root-is-a-file", lambda w: _train(w, "data.name=imagefolder", f"data.root={w.a / 'a_file'}"), 1,
     r"image folder .*a_file does not exist \(data\.root\)"),
    ("imagefolder-corrupt-image", lambda w: _train(w, "data.name=imagefolder", f"data.root={w.a / 'corrupt_images'}",
                                                   "data.options={image_size: 8}", "data.batch_size=64"), 1,
     r"^error: cannot read image file .*corrupt_images/train/cat/broken\.png: cannot identify image file"),
    ("imagefolder-corrupt-image-in-worker", lambda w: _train(
        w, "data.name=imagefolder", f"data.root={w.a / 'corrupt_images'}", "data.options={image_size: 8}",
        "data.batch_size=64", "data.num_workers=1"), 1,
     r"^error: cannot read image file .*broken\.png: .* \(in DataLoader worker process 0\)$"),
    pytest.param("device-cuda-without-gpu", lambda w: _train(w, "trainer.device=cuda"), 1,
                 r"Device 'cuda' was asked for, but this machine has no CUDA GPU", marks=NO_GPU,
                 id="device-cuda-without-gpu"),
    ("device-ids-beyond-count", lambda w: _train(w, "trainer.parallel=dp", "trainer.device_ids=[0,7]"), 1,
     r"device_ids.*7.*(no CUDA GPU|do not exist)"),
    ("device-unknown", lambda w: _train(w, "trainer.device=tpu"), 1,
     r"Unknown device 'tpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    pytest.param("nccl-without-gpu", lambda w: _train(w, "distributed.backend=nccl",
                                                      "distributed.nproc_per_node=2"), 1,
                 r"distributed\.backend=nccl needs CUDA GPUs and this machine has none", marks=NO_GPU,
                 id="nccl-without-gpu"),
    ("resume-not-a-run", lambda w: ["train", "--resume", w.a / "not_a_run"], 2,
     r"--resume '.*not_a_run' is not a run folder \(no config\.yaml\)"),
    ("resume-missing-folder", lambda w: ["train", "--resume", w.tmp / "gone"], 2,
     r"--resume '.*gone' is not a run folder"),
    ("evaluate-missing-path", lambda w: ["evaluate", w.tmp / "gone"], 2,
     r"'.*gone' does not exist: give a run folder or a checkpoint file"),
    ("evaluate-truncated-checkpoint", lambda w: ["evaluate", w.a / "truncated.pt"], 1,
     r"'.*truncated\.pt' is not a readable checkpoint \(truncated or corrupt\?\): its zip archive cannot be read"),
    ("evaluate-damaged-checkpoint", lambda w: ["evaluate", w.a / "damaged.pt"], 1,
     r"'.*damaged\.pt' is not a readable checkpoint .*: the data of its entry '.*' fails its CRC-32 check"),
    ("evaluate-not-a-checkpoint", lambda w: ["evaluate", w.a / "notes.pt"], 1,
     r"'.*notes\.pt' is not a readable checkpoint .*: it is neither a zip archive nor a pickle"),
    ("evaluate-checkpoint-of-another-model", lambda w: ["evaluate", w.a / "other_model.pt"], 1,
     r"Checkpoint '.*other_model\.pt' holds alexnet\(num_classes=10, in_channels=1\), which does not fit"),
    ("evaluate-code-running-pickle", lambda w: ["evaluate", w.a / "evil.pt"], 1,
     r"Checkpoint '.*evil\.pt' was not loaded: unpickling it would run code \(posix\.system\)"),
    ("evaluate-code-running-legacy-pickle", lambda w: ["evaluate", w.a / "evil_legacy.pt"], 1,
     r"Checkpoint '.*evil_legacy\.pt' was not loaded: unpickling it would run code \(posix\.system\)"),
    ("evaluate-run-without-checkpoints", lambda w: ["evaluate", w.tmp / "fake_run"], 1,
     r"Run folder '.*fake_run' holds no best/last checkpoint in checkpoints/"),
    pytest.param(
        "resume-with-another-optimizer", lambda w: ["train", "--resume", w.run, "optimizer.name=sgd",
                                                   "trainer.max_epochs=2"], 1,
        r"Could not load 'optimizer' from '.*last_iteration=\d+\.pt': it was saved from another kind of "
        r"optimizer than SGD \(its settings lack dampening, momentum\)",
        id="resume-with-another-optimizer",
    ),
    pytest.param(
        "resume-with-other-data", lambda w: ["train", "--resume", w.run, "data.name=shapes",
                                            "trainer.max_epochs=2"], 1,
        r"Resuming with a config that changes the model is refused: file has small_cnn\(num_classes=10, "
        r"in_channels=1\), config asks small_cnn\(num_classes=10, in_channels=3\)",
        id="resume-with-other-data",
    ),
    pytest.param(
        "model-too-deep-for-the-images", lambda w: _train(w, "model.name=alexnet"), 2,
        r"Model 'alexnet' cannot take the 1x8x8 images of data set 'digits': .*Output size is too small",
        id="model-too-deep-for-the-images",
    ),
]


def _params(cases):
    return [case if hasattr(case, "marks") else pytest.param(*case, id=case[0]) for case in cases]


@pytest.mark.parametrize(("name", "argv", "code", "pattern"), _params(CONFIG_MISTAKES + RUNTIME_MISTAKES))
def test_mistake_is_one_clear_error_and_harms_nothing(world, w, capsys, name, argv, code, pattern):
    (w.tmp / "fake_run" / "checkpoints").mkdir(parents=True)
    (w.tmp / "fake_run" / "config.yaml").write_text("name: fake\n")
    result = cli(argv(w), capsys)
    assert_clean_error(result, code, pattern)
    assert tree_hashes(w.out) == world.hashes, "the earlier run, or the output folder, changed"
    assert tree_hashes(w.a) == world.input_hashes, "an input file changed, or something was written beside it"
    assert not any(w.cwd.iterdir()), "something was written to the current folder"
    assert not (w.a / "pickle-ran").exists() and not (w.a / "yaml-ran").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: the check cannot fail as root "
                    "(test_mistake_is_one_clear_error_and_harms_nothing[output-dir-under-a-file] covers root)")
def test_read_only_output_dir(w, capsys):
    parent = w.tmp / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        result = cli(_train(w, f"output_dir={parent / 'runs'}"), capsys)
    finally:
        parent.chmod(0o755)
    assert_clean_error(result, 1, r"output_dir '.*read_only/runs' is not writable \('.*read_only' is read-only\)")
    assert not any(parent.iterdir())


def test_catalogue_is_large_and_distinct():
    ids = [case.id if hasattr(case, "id") else case[0] for case in CONFIG_MISTAKES + RUNTIME_MISTAKES]
    assert len(ids) == len(set(ids)) >= 30


# ---------------------------------------------------------------- security


@functools.lru_cache(maxsize=1)
def _ember_sources() -> list[tuple[Path, ast.AST]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"))) for path in sorted(EMBER.rglob("*.py"))]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _calls(name_endings: tuple[str, ...]):
    for path, tree in _ember_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func).endswith(name_endings):
                yield path, node


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_torch_load_reads_weights_only():
    loads = list(_calls(("torch.load",)))
    assert loads, "no torch.load found: the test would check nothing"
    for path, call in loads:
        value = _keyword(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{call.lineno}"
    for path, tree in _ember_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                assert "load" not in {alias.name for alias in node.names}, f"{path}:{node.lineno}"


def test_nothing_unpickles_or_evaluates_code():
    banned = ("pickle.load", "pickle.loads", "marshal.loads", "dill.load", "yaml.load", "yaml.unsafe_load",
              "yaml.full_load", "yaml.full_load_all", "yaml.load_all")
    assert list(_calls(banned)) == []
    for path, call in _calls(("np.load", "numpy.load")):
        value = _keyword(call, "allow_pickle")
        assert value is None or (isinstance(value, ast.Constant) and value.value is False), f"{path}:{call.lineno}"
    for path, tree in _ember_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec", "__import__"), f"{path}:{node.lineno}"


def test_no_shell_is_ever_invoked():
    assert list(_calls(("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"))) == []
    for path, tree in _ember_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                value = _keyword(node, "shell")
                assert value is None or (isinstance(value, ast.Constant) and value.value is False), (
                    f"{path}:{node.lineno} passes shell="
                )


def test_yaml_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"could not determine a constructor for the tag"):
        load_config(config)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../x", "..", ".", "a/b", "/etc", "a\0b", " "])
def test_run_name_never_leaves_output_dir(name):
    with pytest.raises(ConfigError, match=r"Config key 'name' should be a non-empty run name without '/'"):
        load_config({"name": name})
