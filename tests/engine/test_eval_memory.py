"""Evaluation keeps no autograd graph, so its memory does not grow with the batches it has seen."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from ember.engine import create_evaluator, eval_step
from ember.models import get_model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return get_model("small_cnn", num_classes=10, in_channels=1, width=8)


def test_evaluation_outputs_carry_no_graph(tiny_loader):
    model = _model()
    evaluator = create_evaluator(model, loss_fn=nn.CrossEntropyLoss())
    outputs = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    evaluator.run(tiny_loader)
    assert outputs
    for output in outputs:
        for name in ("y_pred", "pred", "loss"):
            assert output[name].grad_fn is None and not output[name].requires_grad, name
            assert output[name].is_inference(), name  # inference_mode: not even version counters
    assert all(p.grad is None for p in model.parameters())


def test_recipe_style_forward_does_carry_a_graph(tiny_data):
    """The contrast the test above relies on: eval mode alone does not stop autograd."""
    model = _model().train(False)
    assert model(tiny_data[:4][0]).grad_fn is not None
    out = eval_step(model)(Engine(lambda e, b: None), tiny_data[:4])
    assert out["y_pred"].grad_fn is None


# Evaluates small_cnn on `shapes` for N batches, keeping every output (as a handler
# collecting predictions would), and prints the peak RSS in MB. "recipe" runs the
# classic test loop's forward instead: eval mode, but autograd on.
_SCRIPT = r"""
import resource, sys, torch
from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import DataLoader
from ember.data import get_dataset
from ember.engine import create_evaluator
from ember.models import get_model

mode, batches = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
torch.manual_seed(0)
model = get_model("small_cnn", num_classes=8, in_channels=3)
dataset = get_dataset("shapes", split="test", image_size=16, length=16 * batches)
loader = DataLoader(dataset, batch_size=16)
if mode == "ember":
    evaluator = create_evaluator(model, loss_fn=nn.CrossEntropyLoss())
else:
    def recipe(engine, batch):
        model.train(False)
        return {"y_pred": model(batch[0]), "y": batch[1]}
    evaluator = Engine(recipe)
kept = []
evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: kept.append(e.state.output["y_pred"]))
evaluator.run(loader)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
"""


def _peak_rss_mb(mode: str, batches: int) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode, str(batches)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units differ by platform")
def test_peak_memory_does_not_grow_with_batches():
    short, long = _peak_rss_mb("ember", 50), _peak_rss_mb("ember", 500)
    assert long - short < 50, f"peak RSS {short:.0f} MB after 50 batches, {long:.0f} MB after 500"
    # the measurement can fail: the recipe's forward keeps a graph per kept output
    recipe_short, recipe_long = _peak_rss_mb("recipe", 50), _peak_rss_mb("recipe", 150)
    assert recipe_long - recipe_short > 50, (recipe_short, recipe_long)
