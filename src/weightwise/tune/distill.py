"""Knowledge distillation's loss (Hinton et al. 2015), as a pure function of logits: the student's next-token
distributions pulled towards a teacher's, both softened by a temperature T, scaled by T² so that its gradients keep
their size as T changes. qat.py mixes it with the task loss (``distill_weight``); the teacher is the float model."""

from __future__ import annotations

import torch

from weightwise.data.tasks import IGNORE_INDEX
from weightwise.evaluate.divergence import kl_divergence


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T² · Σ KL(softmax(teacher/T) ‖ softmax(student/T)) over the positions whose next token is labelled (the
    positions the task loss scores; ``labels`` (B, L) as the loop's batches, logits (B, L, V)); float32, summed."""
    scored = labels[:, 1:].to(student_logits.device) != IGNORE_INDEX
    student = student_logits[:, :-1][scored].float() / temperature
    teacher = teacher_logits[:, :-1][scored].float() / temperature
    return temperature**2 * kl_divergence(teacher, student).sum()
