"""The training objective: cross-entropy plus the configured extras.

`Objective(model, images, targets)` returns the loss of one batch, so the training loop
needs no special case for distillation, centre loss or mixed (soft) targets.
- label smoothing (trick 14): `CrossEntropyLoss(label_smoothing=...)`;
- distillation from a teacher (trick 12): KL divergence of softened outputs, and matching of
  L2-normalised feature maps (or of attention maps, Real-to-Binary Net's) between named
  layers; label refinery is KL with weight 1 against a previous model of the student itself;
- distillation from a teacher and an assistant that changes over the stage, each sample
  weighting the two by its cross-entropies to them (BNext's assistant teachers);
- centre loss (trick 14) on the penultimate features, meant for stage 2.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from .distill_losses import FEATURE_LOSSES, WEIGHTINGS, assistant_index, attention_loss, multi_teacher_loss
from .errors import ConfigError
from .registry import choose


class FeatureTaps:
    """Keeps the latest output of named submodules (forward hooks stay registered), in
    `outputs`, by name.

    Args:
        model: the model whose submodules are tapped.
        names: their names, as `named_modules` gives them.
        inputs: keep what each one receives (its first input) rather than what it returns.

    Raises:
        ConfigError: a name the model has no submodule of.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], inputs: bool = False) -> None:
        modules = dict(model.named_modules())
        self.outputs: dict[str, Tensor] = {}
        for name in names:
            if name not in modules:
                raise ConfigError(f"{type(model).__name__} has no layer '{name}' to take features from")
            if inputs:  # what the layer receives, e.g. the classifier's input features
                modules[name].register_forward_pre_hook(lambda m, args, n=name: self.outputs.__setitem__(n, args[0]))
            else:
                modules[name].register_forward_hook(lambda m, args, out, n=name: self.outputs.__setitem__(n, out))


class CenterLoss(nn.Module):
    """Mean squared distance of each sample's features to its class centre (Wen et al. 2016).
    The centres are parameters, trained by the optimizer and saved in the checkpoint.

    Args:
        num_classes: the number of classes, one centre each.
        dim: the features' dimension.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, dim) * 0.01)

    def forward(self, features: Tensor, targets: Tensor) -> Tensor:
        labels = targets.argmax(1) if targets.dim() == 2 else targets  # mixed targets: the main class
        return 0.5 * (features - self.centers[labels]).pow(2).sum(1).mean()


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of outputs softened by `temperature`, scaled by T^2 (Hinton et al.).

    Args:
        student: the student's logits.
        teacher: the teacher's logits.
        temperature: T.

    Returns:
        The loss, averaged over the batch.
    """
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                    reduction="batchmean") * t * t


def feature_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """|| F_T / ||F_T||_2 - F_S / ||F_S||_2 ||_2^2 per sample, averaged over the batch.

    Args:
        student: the student's feature map, of the teacher's shape.
        teacher: the teacher's feature map.

    Returns:
        The loss.
    """
    s = F.normalize(student.flatten(1), dim=1)
    t = F.normalize(teacher.flatten(1), dim=1)
    return (t - s).pow(2).sum(1).mean()


class Objective(nn.Module):
    """The loss of one batch, `objective(model, images, targets)`: cross-entropy with label
    smoothing, plus distillation from a teacher (and its assistants) and centre loss where they
    are configured.

    Args:
        model: the student; the feature pairs and the centre loss tap its layers.
        label_smoothing: the cross-entropy's label smoothing (trick 14).
        teacher: the frozen teacher, or None. It is kept outside the module tree: neither
            trained nor checkpointed.
        kd_weight: the weight of the distillation term; the cross-entropy's is 1 - kd_weight.
        temperature: the distillation term's temperature.
        feature_weight: the weight of the feature-matching term.
        feature_pairs: [student layer, teacher layer] pairs whose outputs are matched.
        center: the centre loss on the classifier's input features, or None.
        center_weight: its weight.
        assistants: frozen teachers that take turns beside `teacher` (`set_epoch` picks the
            epoch's); with them the distillation term is `multi_teacher_loss` of the assistant
            and the teacher, without them `kd_loss` of the teacher.
        weighting: `multi_teacher_loss`'s weighting.
        feature_loss: `l2_normalized` (`feature_loss`, summed over the pairs) or `attention`
            (`attention_loss`, averaged over the pairs, as larq-zoo does).

    Raises:
        ConfigError: a layer named in `feature_pairs`, or the classifier the centre loss reads,
            that the model lacks.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, teacher: nn.Module | None = None,
                 kd_weight: float = 0.0, temperature: float = 1.0, feature_weight: float = 0.0,
                 feature_pairs: list[list[str]] | None = None, center: CenterLoss | None = None,
                 center_weight: float = 0.0, assistants: list[nn.Module] | None = None,
                 weighting: str = "cross_entropy", feature_loss: str = "l2_normalized") -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.kd_weight, self.temperature = kd_weight, temperature
        self.weighting = choose("distill.weighting", weighting, WEIGHTINGS)
        self.feature_kind = choose("distill.feature_loss", feature_loss, FEATURE_LOSSES)
        self.feature_weight, self.pairs = feature_weight, [tuple(p) for p in (feature_pairs or [])]
        self.center, self.center_weight = center, center_weight
        # The teachers are kept outside the module tree: they are neither trained nor checkpointed.
        self.__dict__["teacher"] = teacher
        self.__dict__["assistants"] = list(assistants or [])
        self.assistant = 0  # the index of the assistant teaching now
        if teacher is not None and self.feature_weight:
            self.student_taps = FeatureTaps(model, [s for s, _ in self.pairs])
            self.teacher_taps = FeatureTaps(teacher, [t for _, t in self.pairs])
        if center is not None:
            self.penultimate = FeatureTaps(model, ["classifier"], inputs=True)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Pick the assistant of `epoch` (`assistant_index`); nothing without assistants.

        Args:
            epoch: the epoch about to train, from 0.
            epochs: the stage's epochs.
        """
        if self.assistants:
            self.assistant = assistant_index(epoch, epochs, len(self.assistants))

    def teachers(self) -> list[nn.Module]:
        """The teachers of the epoch under way.

        Returns:
            [the assistant, the teacher] with assistants, else [the teacher]; [] without one.
        """
        if self.teacher is None:
            return []
        return [self.assistants[self.assistant], self.teacher] if self.assistants else [self.teacher]

    def forward(self, model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        """The batch's loss.

        Args:
            model: the student as the loop runs it (possibly wrapped).
            images: the batch's images.
            targets: class indices, or class probabilities (mixed batches).

        Returns:
            The loss, a scalar tensor.

        Raises:
            ConfigError: a feature pair whose two layers' outputs do not match.
        """
        logits = model(images)
        loss = self.ce(logits, targets)
        teachers = self.teachers()
        if teachers:
            outputs = self._teacher_logits(teachers, images)
            if self.kd_weight:
                distilled = (kd_loss(logits, outputs[0], self.temperature) if len(outputs) == 1 else
                             multi_teacher_loss(logits, outputs, self.temperature, self.weighting))
                loss = (1 - self.kd_weight) * loss + self.kd_weight * distilled
            if self.feature_weight:
                loss = loss + self.feature_weight * self._features()
        if self.center is not None:
            loss = loss + self.center_weight * self.center(self.penultimate.outputs["classifier"], targets)
        return loss

    @staticmethod
    @torch.no_grad()
    def _teacher_logits(teachers: list[nn.Module], images: Tensor) -> list[Tensor]:
        """Each teacher's logits, at least float32 (BNext's code casts its autocast teachers'); a
        teacher listed twice runs once."""
        seen: dict[int, Tensor] = {}
        for teacher in teachers:
            if id(teacher) not in seen:
                logits = teacher(images)
                seen[id(teacher)] = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return [seen[id(teacher)] for teacher in teachers]

    def _features(self) -> Tensor:
        attention = self.feature_kind == "attention"
        total = 0.0
        for s_name, t_name in self.pairs:
            s, t = self.student_taps.outputs[s_name], self.teacher_taps.outputs[t_name]
            # Attention maps need the same positions only; the L2-normalised maps the same shape.
            fits = (s.dim() == t.dim() == 4 and (s.shape[0], *s.shape[2:]) == (t.shape[0], *t.shape[2:])
                    if attention else s.shape == t.shape)
            if not fits:
                need = "of the same batch and spatial size (4-D)" if attention else "of the same shape"
                raise ConfigError(f"distill.feature_pairs: student '{s_name}' gives {tuple(s.shape)} but teacher "
                                  f"'{t_name}' gives {tuple(t.shape)}; pair layers {need}")
            total = total + (attention_loss(s, t) if attention else feature_loss(s, t))
        return total / max(len(self.pairs), 1) if attention else total


def build_objective(cfg: DictConfig, model: nn.Module, num_classes: int, teacher: nn.Module | None,
                    assistants: list[nn.Module] | None = None) -> Objective:
    """The objective of one stage, from `cfg.loss` and, where this stage has a teacher, `cfg.distill`.

    Args:
        cfg: a stage config.
        model: the network it trains.
        num_classes: the data's classes (the centre loss has a centre each).
        teacher: the stage's teacher, or None.
        assistants: the teacher's assistants (`distill.assistants`), or None.

    Returns:
        The objective; its parameters (the centres) go to the optimizer too.
    """
    center_cfg = cfg.loss.center
    use_center = center_cfg.weight > 0 and cfg.stage.name in center_cfg.stages
    center = CenterLoss(num_classes, model.num_features) if use_center else None
    distill: dict[str, Any] = {}
    if teacher is not None:  # built only where `distill` names this stage
        keys = ("kd_weight", "temperature", "feature_weight", "feature_pairs")
        distill = {key: cfg.distill[key] for key in keys}
        # Absent from the configs of checkpoints saved before they existed: their defaults.
        distill["weighting"] = cfg.distill.get("weighting", "cross_entropy")
        distill["feature_loss"] = cfg.distill.get("feature_loss", "l2_normalized")
    return Objective(model, label_smoothing=cfg.loss.label_smoothing, teacher=teacher, center=center,
                     center_weight=center_cfg.weight, assistants=assistants, **distill)
