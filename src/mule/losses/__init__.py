"""Losses as pure tensor functions: logits and per-position weights in, (scalar, metrics) out.

Every distillation loss takes
    student_logits (N, V): the student's raw logits at the N response positions of the batch (with grad),
    teacher_logits (N, V): the teacher's raw logits at the same response-token indices (no grad),
    (SFT takes the target token ids (N,) in place of the teacher's logits.)
    weights (N,): per-position weights; 1 / (B * T_e) for a position of example e of length T_e gives the
        paper's reduction (mean over an example's tokens, then mean over the batch); 0 masks a position.
"""

from mule.losses.bild import bild_loss
from mule.losses.bitopk import bidirectional_topk_loss, topk_smooth_l1
from mule.losses.duet import duet_loss
from mule.losses.sft import sft_loss

__all__ = ["bidirectional_topk_loss", "bild_loss", "duet_loss", "sft_loss", "topk_smooth_l1"]
