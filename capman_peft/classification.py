"""Image classifiers on long-tailed data: the networks, the long-tail losses (CE, LDAM-DRW, logit adjustment), and
capacity manipulation for a classifier (paper sec. G.11, Tab. G.13).

CM carries over from diffusion as the paper describes it: every convolution's weight is split as W = W^g + BA
(the tuner in full mode), θ is the network with the experts and θ^g without, and L_CM of Eq. 2-3 (``cm_loss``, the
same ω weights and forms) compares their predictions on every training image. A classifier's prediction is its class
distribution, so the distance is taken on the softmax probabilities and the relative forms' "own error" of θ is the
RMS distance of its probabilities to the one-hot label (docs/method.md). ``train_classifier_cm.py`` is the command
line; ``capman-downstream`` trains its plain classifiers here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from sklearn.metrics import precision_recall_fscore_support
from torch import Tensor, nn

from .objective.cm import DEFAULT_RELATIVE_MARGIN, RELATIVE_FORMS, cm_loss, cm_weights

CLASSIFIERS = ("resnet18", "small_cnn")
LOSSES = ("ce", "ldam_drw", "logit_adjustment")
# Where a classifier's experts go: every convolution, or only the last stage's (the analogue of the UNet's up path).
EXPERT_LAYERS = ("all", "last")
CM_DISTANCES = ("probabilities", "logits")
METRICS = ("precision", "recall", "accuracy", "many_accuracy", "medium_accuracy", "few_accuracy")
# LDAM-DRW as its authors run it (kaidic/LDAM-DRW, cifar_train.py and losses.py): the largest margin 0.5, logits of a
# normalised head scaled by 30, and class-balanced weights (effective number, beta 0.9999) from 80% of the epochs on
# (their epoch 160 of 200).
LDAM_MAX_MARGIN = 0.5
LDAM_SCALE = 30.0
DRW_BETA = 0.9999
DRW_START = 0.8

Images = tuple[torch.Tensor, torch.Tensor]
"""uint8 images N x 3 x H x W and their class ids N."""


class NormedLinear(nn.Linear):
    """The cosine head LDAM is trained with (the authors' ``use_norm``): features and class weights L2-normalised,
    no bias, so every logit lies in [-1, 1] before LDAM's scale."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


def build_classifier(name: str, num_classes: int, normed_head: bool = False) -> nn.Module:
    """``resnet18``: torchvision's ResNet-18 with the CIFAR stem (a 3 x 3 stride-1 first convolution, no max-pool),
    for 32 px and larger; ``small_cnn``: three conv layers and a linear head, for the small testbeds. `normed_head`:
    the cosine head of LDAM (``plain_classifier`` turns it back into an ``nn.Linear``)."""
    if name == "resnet18":
        model = torchvision.models.resnet18(num_classes=num_classes)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        if normed_head:
            model.fc = NormedLinear(model.fc.in_features, num_classes)
        return model
    if name == "small_cnn":
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 32), (32, 64), (64, 128)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        head = NormedLinear(128, num_classes) if normed_head else nn.Linear(128, num_classes)
        return nn.Sequential(*layers[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {name!r}")


def plain_classifier(model: nn.Module) -> nn.Module:
    """The classifier with a cosine head replaced by an ``nn.Linear`` of the normalised class weights and no bias.

    Its logits are the cosine logits times each image's feature norm, a positive factor per image, so every
    prediction (the arg max) is the same; the model is then an ordinary torchvision / torch module."""
    for name, module in list(model.named_modules()):
        if isinstance(module, NormedLinear):
            plain = nn.Linear(module.in_features, module.out_features).to(module.weight)
            with torch.no_grad():
                plain.weight.copy_(F.normalize(module.weight, dim=1))
                plain.bias.zero_()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    return model


def expert_target_modules(model: nn.Module, layers: str) -> list[str]:
    """The names of the convolutions that get an expert: every one, or those of the last stage (ResNet's
    ``layer4``; the small CNN's last convolution)."""
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if layers == "all":
        return convs
    if layers == "last":
        last_stage = [name for name in convs if name.startswith("layer4.")]
        return last_stage or convs[-1:]
    raise ValueError(f"expert layers must be one of {EXPERT_LAYERS}, got {layers!r}")


def ldam_margins(class_counts: Sequence[int], max_margin: float = LDAM_MAX_MARGIN) -> Tensor:
    """LDAM's per-class margins (Cao et al. 2019, Eq. 13): proportional to n_c^(-1/4), the largest equal to
    `max_margin`."""
    counts = torch.tensor(class_counts, dtype=torch.float64)
    margins = counts.pow(-0.25)
    return (margins * max_margin / margins.max()).float()


def drw_weights(class_counts: Sequence[int], beta: float = DRW_BETA) -> Tensor:
    """Deferred re-weighting's class weights: (1 - beta) / (1 - beta^n_c), normalised to sum to the number of classes
    (Cui et al. 2019's effective number, as LDAM-DRW uses it)."""
    counts = torch.tensor(class_counts, dtype=torch.float64)
    weights = (1 - beta) / (1 - beta**counts)
    return (weights / weights.sum() * len(counts)).float()


def ldam_loss(logits: Tensor, labels: Tensor, margins: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy of ``LDAM_SCALE`` x the logits with the true class's logit lowered by its margin."""
    shifted = logits - F.one_hot(labels, logits.shape[1]) * margins.to(logits)[labels, None]
    return F.cross_entropy(LDAM_SCALE * shifted, labels, weight=None if weight is None else weight.to(logits))


def logit_adjusted_loss(logits: Tensor, labels: Tensor, class_counts: Sequence[int], tau: float = 1.0) -> Tensor:
    """The logit-adjusted loss (Menon et al. 2021, Eq. 10): cross-entropy of the logits plus tau x log of each
    class's prior in the training set."""
    prior = torch.tensor(class_counts, dtype=torch.float64) / sum(class_counts)
    return F.cross_entropy(logits + tau * prior.log().to(logits), labels)


@dataclass(frozen=True)
class ClassifierCM:
    """Capacity manipulation for a classifier: the expert's rank ratio and layers, and L_CM's weight, form and
    distance (the defaults are the diffusion scripts' where one exists)."""

    form: str = "relative"
    weight: float = 1.0
    relative_margin: float = DEFAULT_RELATIVE_MARGIN
    margin: float = 0.1
    expert_rank_ratio: float = 0.1
    expert_layers: str = "all"
    distance: str = "probabilities"


@dataclass(frozen=True)
class ClassifierTraining:
    """How each classifier is trained: SGD with momentum 0.9 and a cosine learning rate (the usual CIFAR ResNet
    recipe), optionally with random crops (padding of 1/8 of the side) and horizontal flips; the long-tail loss, and
    CM when `cm` is given."""

    classifier: str = "resnet18"
    epochs: int = 200
    batch_size: int = 128
    learning_rate: float = 0.1
    weight_decay: float = 5e-4
    random_crop: bool = False
    random_flip: bool = False
    loss: str = "ce"
    cm: ClassifierCM | None = None
    device: str = "cpu"


def _augment(x: torch.Tensor, settings: ClassifierTraining, generator: torch.Generator) -> torch.Tensor:
    """A random crop of the zero-padded batch and a horizontal flip per image, as the settings ask."""
    n, side = x.shape[0], x.shape[-1]
    if settings.random_crop:
        pad = max(1, side // 8)
        padded = F.pad(x, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy : dy + side, dx : dx + side] for i, (dy, dx) in enumerate(offsets)])
    if settings.random_flip:
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    return x


def _inputs(images: torch.Tensor, device: str) -> torch.Tensor:
    return images.to(device).float() / 127.5 - 1


@contextmanager
def _batchnorm_stats_kept(model: nn.Module):
    """BatchNorm layers normalise with the batch's statistics but leave their running statistics as they are (the
    θ^g pass must not count twice in them)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum


class ClassifierLoss:
    """One step's loss: the long-tail loss on θ's logits, plus λ·L_CM between θ and θ^g when CM is on."""

    def __init__(self, settings: ClassifierTraining, class_counts: Sequence[int]) -> None:
        if settings.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {settings.loss!r}")
        self.settings, self.counts = settings, list(class_counts)
        self.margins = ldam_margins(self.counts) if settings.loss == "ldam_drw" else None
        self.drw = drw_weights(self.counts) if settings.loss == "ldam_drw" else None
        cm = settings.cm
        self.cm_weights = None if cm is None else cm_weights(self.counts, cm.form).to(settings.device)

    def base(self, logits: Tensor, labels: Tensor, epoch: int) -> Tensor:
        loss = self.settings.loss
        if loss == "ldam_drw":
            deferred = epoch >= int(DRW_START * self.settings.epochs)
            return ldam_loss(logits, labels, self.margins, self.drw if deferred else None)
        if loss == "logit_adjustment":
            return logit_adjusted_loss(logits, labels, self.counts)
        return F.cross_entropy(logits, labels)

    def __call__(self, model: nn.Module, x: Tensor, labels: Tensor, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        from .tuner import expert_disabled

        logits = model(x)
        loss = self.base(logits, labels, epoch)
        cm = self.settings.cm
        if cm is None:
            return loss, {}
        with expert_disabled(model), _batchnorm_stats_kept(model):
            logits_g = model(x)
        if cm.distance == "probabilities":
            full, general = logits.softmax(1), logits_g.softmax(1)
            target = F.one_hot(labels, logits.shape[1]).to(full)
        else:
            full, general, target = logits, logits_g, None
        term, stats = cm_loss(
            full, general, labels, self.cm_weights, form=cm.form, margin=cm.margin,
            relative_margin=cm.relative_margin, target=target,
        )  # fmt: skip
        return loss + cm.weight * term, stats


def check_cm(cm: ClassifierCM) -> None:
    """Refuse settings that do not combine (one line, before any work)."""
    if cm.distance not in CM_DISTANCES:
        raise ValueError(f"CM distance must be one of {CM_DISTANCES}, got {cm.distance!r}")
    if cm.distance == "logits" and cm.form in RELATIVE_FORMS:
        raise ValueError(
            f"form {cm.form!r} measures the margin against θ's error on the one-hot label, which logits do not "
            "have; use distance 'probabilities' or a fixed-margin form (hinge, hinge_general)"
        )
    if cm.expert_layers not in EXPERT_LAYERS:
        raise ValueError(f"expert layers must be one of {EXPERT_LAYERS}, got {cm.expert_layers!r}")


def new_classifier(settings: ClassifierTraining, num_classes: int, seed: int) -> nn.Module:
    """The seeded network: the plain classifier, or with its experts (full mode) when CM is on."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(settings.classifier, num_classes, normed_head=settings.loss == "ldam_drw")
        if settings.cm is not None:
            from peft import get_peft_model

            from .tuner import CapManConfig

            check_cm(settings.cm)
            targets = expert_target_modules(model, settings.cm.expert_layers)
            config = CapManConfig(mode="full", expert_rank_ratio=settings.cm.expert_rank_ratio, target_modules=targets)
            model = get_peft_model(model, config)
    return model.to(settings.device)


def epoch_order(num_images: int, seed: int, epoch: int) -> tuple[Tensor, torch.Generator]:
    """The epoch's image order and its augmentation generator, a function of (seed, epoch) alone, so a run resumed
    at an epoch boundary sees exactly the batches of an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_images, generator=generator), generator


def make_optimizer(model: nn.Module, settings: ClassifierTraining, num_images: int) -> tuple[Any, Any]:
    """SGD with momentum 0.9 and weight decay, and a cosine schedule over every step of the run."""
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate, momentum=0.9,
        weight_decay=settings.weight_decay,
    )  # fmt: skip
    steps = settings.epochs * math.ceil(num_images / settings.batch_size)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    settings: ClassifierTraining,
    seed: int,
    *,
    model: nn.Module | None = None,
    optimizer: Any = None,
    schedule: Any = None,
    start_epoch: int = 0,
    on_epoch_end: Callable[[int, nn.Module, Any, Any], None] | None = None,
) -> nn.Module:
    """A classifier trained from a seeded initialisation with seeded batches and augmentation.

    A resumed run passes the model, optimizer and schedule it restored and the epoch to start from;
    ``on_epoch_end(epochs_done, model, optimizer, schedule)`` is called after every epoch (checkpoints)."""
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    if model is None:
        model = new_classifier(settings, num_classes, seed)
        optimizer, schedule = make_optimizer(model, settings, len(labels))
    step_loss = ClassifierLoss(settings, counts)
    model.train()
    for epoch in range(start_epoch, settings.epochs):
        order, generator = epoch_order(len(labels), seed, epoch)
        for start in range(0, len(order), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            x = _augment(_inputs(images[rows], settings.device), settings, generator)
            loss, _ = step_loss(model, x, labels[rows].to(settings.device), epoch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the classifier's loss is {loss.item()} at epoch {epoch + 1}; lower the rate")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model, optimizer, schedule)
    return model.eval()


@torch.no_grad()
def score_classifier(
    model: nn.Module, test: Images, splits: Mapping[str, Sequence[int]], device: str, batch_size: int = 256
) -> dict[str, float]:
    """Macro precision and recall, accuracy, and the accuracy on the held-out images of each split's classes."""
    images, labels = test
    batches = range(0, len(labels), batch_size)
    predicted = torch.cat([model(_inputs(images[i : i + batch_size], device)).argmax(1).cpu() for i in batches])
    precision, recall, _, _ = precision_recall_fscore_support(
        labels.numpy(), predicted.numpy(), labels=list(range(int(labels.max()) + 1)), average="macro", zero_division=0
    )
    correct = (predicted == labels).float()
    scores = {"precision": float(precision), "recall": float(recall), "accuracy": correct.mean().item()}
    for split, classes in splits.items():
        in_split = torch.isin(labels, torch.tensor(list(classes), dtype=labels.dtype))
        scores[f"{split}_accuracy"] = correct[in_split].mean().item() if in_split.any() else float("nan")
    return scores
