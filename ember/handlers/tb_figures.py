"""Pictures of an evaluation for TensorBoard: confusion matrix, PR curves, misclassified examples.

:class:`EvaluationFigures` accumulates, over one run of an evaluator, the confusion
counts and a capped sample of softmax probabilities (both on the evaluator's device,
without waiting for it) and up to ``max_examples`` misclassified inputs; when the
evaluation completes it writes a confusion-matrix image, one PR curve per class and
a grid of the misclassified inputs labelled with their true and predicted classes.

Images are drawn with Pillow (an ember dependency), not matplotlib, which ember does
not require: one code path that gives the same picture on every machine.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from PIL import Image, ImageDraw, ImageFont
from torch.nn import functional as F

__all__ = ["EvaluationFigures", "render_confusion_matrix", "render_examples"]

logger = logging.getLogger(__name__)

_MAX_PR_CLASSES = 50  # per-class PR curves past this many classes would swamp the dashboard
_MAX_SCANNED_BATCHES = 16  # batches searched for misclassified examples per evaluation
_BLUE = (8, 48, 107)  # darkest cell colour; white is an empty row


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def _text_size(font: Any, text: str) -> tuple[int, int]:
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    return right - left, bottom


def _fit(text: str, font: Any, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if _text_size(font, text)[0] <= width:
        return text
    while len(text) > 1 and _text_size(font, text + "…")[0] > width:
        text = text[:-1]
    return text + "…"


def _label(index: int, class_names: Sequence[str] | None) -> str:
    return str(class_names[index]) if class_names is not None else str(index)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a ``(3, H, W)`` uint8 tensor."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).contiguous()


def render_confusion_matrix(
    matrix: torch.Tensor, class_names: Sequence[str] | None = None, *, title: str = ""
) -> torch.Tensor:
    """Draw a confusion matrix as an image.

    Rows are true classes, columns predicted ones; a cell's colour is its share of
    its row (white 0, dark blue 1), so the diagonal reads as per-class recall. Counts
    are written in the cells and class names on the axes when the cells are large
    enough to hold them.

    Args:
        matrix: ``(C, C)`` counts, ``matrix[true, predicted]``.
        class_names: ``C`` names for the axes; default the class indices.
        title: a line drawn above the matrix.

    Returns:
        A ``(3, H, W)`` uint8 image tensor, as ``SummaryWriter.add_image`` takes it.
    """
    counts = matrix.detach().to("cpu", torch.int64)
    n = counts.shape[0]
    share = counts.double() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    cell = max(4, min(48, 640 // n))
    font = _font(11)
    names = [_label(i, class_names) for i in range(n)]
    show_names = cell >= 12
    name_width = min(120, max(_text_size(font, s)[0] for s in names)) + 6 if show_names else 0
    line = _text_size(font, "Ag")[1] + 4
    left, top = name_width + line, 2 * line + name_width
    title = title or "confusion matrix"
    width = max(left + n * cell, _text_size(font, title)[0]) + 8
    height = top + n * cell + 8
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 2), title, fill="black", font=font)
    draw.text((left, line + 2), "predicted", fill="black", font=font)
    _draw_vertical(image, "true", font, (2, top))
    for row in range(n):
        for col in range(n):
            _draw_cell(draw, font, cell, (left + col * cell, top + row * cell),
                       float(share[row, col]), int(counts[row, col]))
    if show_names:
        for i, name in enumerate(names):
            text = _fit(name, font, name_width - 6)
            y = top + i * cell + (cell - line) // 2
            draw.text((line, y), text, fill="black", font=font)
            _draw_vertical(image, text, font, (left + i * cell + (cell - line) // 2, 2 * line))
    return _to_tensor(image)


def _draw_cell(draw: ImageDraw.ImageDraw, font: Any, cell: int, corner: tuple[int, int],
               share: float, count: int) -> None:
    color = tuple(round(255 + (c - 255) * share) for c in _BLUE)
    x, y = corner
    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=color, outline=(220, 220, 220))
    if cell >= 22 and count:
        text = _fit(str(count), font, cell - 2)
        w, h = _text_size(font, text)
        draw.text((x + (cell - w) // 2, y + (cell - h) // 2), text,
                  fill="white" if share > 0.5 else "black", font=font)


def _draw_vertical(image: Image.Image, text: str, font: Any, corner: tuple[int, int]) -> None:
    """Text written bottom-to-top with its top-left corner at ``corner`` (PIL draws only horizontally)."""
    w, h = _text_size(font, text)
    strip = Image.new("RGB", (w + 2, h + 2), "white")
    ImageDraw.Draw(strip).text((1, 1), text, fill="black", font=font)
    image.paste(strip.rotate(90, expand=True), corner)


def render_examples(
    images: torch.Tensor,
    targets: torch.Tensor,
    predictions: torch.Tensor,
    class_names: Sequence[str] | None = None,
    *,
    tile: int = 96,
    nrow: int = 8,
) -> torch.Tensor:
    """A grid of images, each with its true and predicted class written under it.

    Each image is scaled to its own min..max (inputs are usually normalised) and
    resized to ``tile`` pixels on its longer side (nearest neighbour: small inputs
    stay sharp).

    Args:
        images: ``(N, C, H, W)`` inputs; 1 or 3 channels are shown as they are, other
            counts by their first channel.
        targets: ``(N,)`` true classes.
        predictions: ``(N,)`` predicted classes.
        class_names: names for the labels; default the class indices.
        tile: the longer side of each image, in pixels.
        nrow: images per row.

    Returns:
        A ``(3, H, W)`` float image tensor in [0, 1] (``torchvision.utils.make_grid``).
    """
    x = images.detach().to("cpu", torch.float32)
    if x.shape[1] not in (1, 3):
        x = x[:, :1]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - low) / (high - low).clamp(min=1e-8)
    scale = tile / max(x.shape[2], x.shape[3])
    size = (max(1, round(x.shape[2] * scale)), max(1, round(x.shape[3] * scale)))
    x = F.interpolate(x, size=size, mode="nearest")
    font = _font(10)
    tiles = [
        torch.cat([x[i], _caption(int(targets[i]), int(predictions[i]), class_names, font, size[1])], dim=1)
        for i in range(x.shape[0])
    ]
    from torchvision.utils import make_grid  # imported on first use: torchvision is slow to import

    return make_grid(tiles, nrow=nrow, padding=2, pad_value=1.0)


def _caption(target: int, prediction: int, class_names: Sequence[str] | None, font: Any,
             width: int) -> torch.Tensor:
    line = _text_size(font, "Ag")[1] + 2
    band = Image.new("RGB", (width, 2 * line + 2), "white")
    draw = ImageDraw.Draw(band)
    draw.text((2, 1), _fit(f"true {_label(target, class_names)}", font, width - 4), fill="black", font=font)
    draw.text((2, line + 1), _fit(f"pred {_label(prediction, class_names)}", font, width - 4),
              fill=(200, 0, 0), font=font)
    return _to_tensor(band).float() / 255


def _tag_part(index: int, width: int, class_names: Sequence[str] | None) -> str:
    part = f"{index:0{width}d}"
    if class_names is not None:
        part += "_" + re.sub(r"[^\w.-]+", "_", str(class_names[index]))
    return part


class EvaluationFigures:
    """Confusion matrix, per-class PR curves and misclassified examples of one evaluator.

    Attach it to an evaluator whose output is a dict with ``y_pred`` (logits) and
    ``y`` (class indices), as ember's evaluators give. Counts and probabilities stay
    on the evaluator's device until the evaluation completes; finding misclassified
    inputs reads each batch's predictions on the host, only until ``max_examples``
    are found.

    In a distributed run the figures show the share of the data the writing process
    evaluated (the scalar metrics, computed by ignite, cover all of it).

    Args:
        writer: a ``SummaryWriter`` (``TensorboardLogger.writer``).
        split: tag prefix, e.g. ``"val"``: tags are ``val/confusion_matrix``,
            ``val/pr_curve/<class>``, ``val/misclassified``.
        global_step: gives the step to write at (e.g. the trainer's iteration).
        class_names: names of the classes, indexed by class.
        max_pr_samples: samples kept for the PR curves.
        max_examples: misclassified inputs shown.
    """

    def __init__(
        self,
        writer: Any,
        split: str,
        *,
        global_step: Callable[[], int],
        class_names: Sequence[str] | None = None,
        max_pr_samples: int = 10_000,
        max_examples: int = 32,
    ) -> None:
        self.writer = writer
        self.split = split
        self.global_step = global_step
        self.class_names = list(class_names) if class_names is not None else None
        self.max_pr_samples = max_pr_samples
        self.max_examples = max_examples
        self._reset(None)

    def attach(self, evaluator: Engine) -> None:
        """Register on ``evaluator``: reset at STARTED, accumulate per iteration, write at COMPLETED."""
        evaluator.add_event_handler(Events.STARTED, self._reset)
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        evaluator.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, _: Engine | None) -> None:
        self._counts: torch.Tensor | None = None
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._kept = 0
        self._examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._found = 0
        self._scanned = 0
        self._disabled = False

    def _update(self, engine: Engine) -> None:
        if self._disabled:
            return
        output = engine.state.output
        y_pred = output.get("y_pred") if isinstance(output, dict) else None
        y = output.get("y") if isinstance(output, dict) else None
        if not _is_classification(y_pred, y):
            logger.warning("%s figures skipped: the evaluator's output needs `y_pred` (N, C) logits and "
                           "`y` (N,) class indices", self.split)
            self._disabled = True
            return
        num_classes = y_pred.shape[1]
        pred = output.get("pred", y_pred.argmax(dim=1))
        self._count(y, pred, num_classes)
        if self._kept < self.max_pr_samples:
            take = min(y.shape[0], self.max_pr_samples - self._kept)
            # only the columns that get a curve are kept: 10k x 1000 classes would be 40 MB
            self._probs.append(torch.softmax(y_pred[:take].float(), dim=1)[:, :_MAX_PR_CLASSES])
            self._labels.append(y[:take])
            self._kept += take
        # finding the wrong predictions needs them on the host (a device sync): look in the
        # first few batches only, so that a long evaluation of an accurate model stays sync-free
        if self._found < self.max_examples and self._scanned < _MAX_SCANNED_BATCHES:
            self._scanned += 1
            self._collect_examples(engine.state.batch, y, pred)

    def _count(self, y: torch.Tensor, pred: torch.Tensor, num_classes: int) -> None:
        # index_add_ rather than bincount: bincount waits for the device to size its
        # output; labels outside 0..C-1 (e.g. an ignore index) add nothing.
        if self._counts is None:
            self._counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=y.device)
        y, pred = y.long(), pred.long().to(y.device)
        valid = (y >= 0) & (y < num_classes)
        index = torch.where(valid, y * num_classes + pred, torch.zeros_like(y))
        self._counts.index_add_(0, index, valid.long())

    def _collect_examples(self, batch: Any, y: torch.Tensor, pred: torch.Tensor) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) and batch else None
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != y.shape[0]:
            return
        wrong = (pred != y).cpu()
        take = wrong.nonzero().flatten()[: self.max_examples - self._found]
        if take.numel():
            self._examples.append((x[take.to(x.device)].cpu(), y.cpu()[take], pred.cpu()[take]))
            self._found += take.numel()

    def _write(self, _: Engine) -> None:
        if self._counts is None:
            return
        step = int(self.global_step())
        n = int(self._counts.numel() ** 0.5)
        names = self.class_names
        if names is not None and len(names) != n:
            logger.warning("%d class names given for %d classes: the %s figures show class indices",
                           len(names), n, self.split)
            names = None
        counts = self._counts.view(n, n).cpu()
        accuracy = counts.diagonal().sum().item() / max(1, counts.sum().item())
        title = f"{self.split} at step {step}: accuracy {accuracy:.4f}"
        self.writer.add_image(f"{self.split}/confusion_matrix",
                              render_confusion_matrix(counts, names, title=title), step)
        self._write_pr_curves(step, n, names)
        if self._examples:
            images, targets, preds = (torch.cat(parts) for parts in zip(*self._examples))
            self.writer.add_image(f"{self.split}/misclassified",
                                  render_examples(images, targets, preds, names), step)

    def _write_pr_curves(self, step: int, n: int, names: Sequence[str] | None) -> None:
        if n > _MAX_PR_CLASSES:
            logger.info("%s: %d classes, PR curves written for the first %d", self.split, n, _MAX_PR_CLASSES)
        probs = torch.cat(self._probs).cpu()
        labels = torch.cat(self._labels).cpu()
        width = len(str(n - 1))
        for c in range(min(n, _MAX_PR_CLASSES)):
            self.writer.add_pr_curve(f"{self.split}/pr_curve/{_tag_part(c, width, names)}",
                                     labels == c, probs[:, c], step)


def _is_classification(y_pred: Any, y: Any) -> bool:
    return (
        isinstance(y_pred, torch.Tensor)
        and isinstance(y, torch.Tensor)
        and y_pred.dim() == 2
        and y.dim() == 1
        and y.shape[0] == y_pred.shape[0]
        and not y.is_floating_point()
    )
