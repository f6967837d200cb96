"""Knowledge distillation inside ``Trainer``: heal a compressed model against the dense model it came from.

The training loss becomes

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with the KL averaged over the positions that carry a label (the same positions as the cross-entropy; the
logits at position ``t`` predict token ``t + 1``). ``T^2`` keeps the gradient scale of the soft term
independent of ``T`` (Hinton et al., 2015). The teacher is frozen, in eval mode, held by the trainer and not
by the model, so checkpoints and the final model directory contain the student only; a resumed run reloads
the teacher from its directory. Evaluation reports the plain cross-entropy, so validation losses of
distilled and undistilled runs compare directly.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["distillation_loss", "distillation_trainer_class"]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` per labelled position, summed and divided by their count.

    Shapes: logits ``[B, L, V]``, labels ``[B, L]`` (``-100`` = no loss). Position ``t``'s logits are scored where
    ``labels[:, t + 1] != -100``. ``num_items`` (the labelled positions of the whole accumulated batch, as
    ``Trainer`` passes it) replaces the local count so accumulation steps add up like the cross-entropy does.
    """
    mask = labels[:, 1:] != -100
    student = F.log_softmax(student_logits[:, :-1][mask].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1][mask].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum")
    count = num_items if num_items is not None else mask.sum().clamp_min(1)
    return temperature**2 * kl / count


def distillation_trainer_class(base, teacher, alpha: float, temperature: float):
    """A subclass of the ``Trainer`` class ``base`` whose training loss mixes in distillation from ``teacher``."""
    teacher.eval()
    teacher.requires_grad_(False)

    class DistillationTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            if model.training:
                if next(teacher.parameters()).device != outputs.logits.device:
                    teacher.to(outputs.logits.device)
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
                soft = distillation_loss(outputs.logits, teacher_logits, inputs["labels"], temperature, num_items_in_batch)
                loss = (1 - alpha) * loss + alpha * soft
            return (loss, outputs) if return_outputs else loss

    DistillationTrainer.teacher = teacher
    return DistillationTrainer
