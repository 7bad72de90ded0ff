"""Losses as pure tensor functions, and gradient-combination strategies as pure functions on flat vectors.

Every loss returns (scalar, metrics) and takes, by name, what its method needs (`mule.methods`):
    student_logits (N, V): the student's raw logits at the N response positions of the batch (with grad);
    teacher_logits (N, V): the teacher's raw logits at the same response-token indices (no grad);
    labels (N,): the response tokens; reference_logprobs (N,): their log-probs under the base model (NPO);
    hidden (N, H), reference_hidden (N, H): hidden states after one decoder layer (RMU);
    example (N,): the batch row of each position; forget (N,): True at forget-type positions; good (N,): True
        at a refusal template's positions (FLAT);
    weights (N,): per-position weights; 1 / (B * T_e) for a position of example e of length T_e gives the
        paper's reduction (mean over an example's tokens, then mean over the batch); 0 masks a position.
Gradient combination (NGDiff, MOLLM): `ngdiff.normalized_sum`, `mgda.common_descent`, `projection.project_out`.
"""

from mule.losses.bild import bild_loss
from mule.losses.bitopk import bidirectional_topk_loss, topk_smooth_l1
from mule.losses.duet import duet_loss
from mule.losses.flat import flat_loss
from mule.losses.ga import ga_loss
from mule.losses.graddiff import graddiff_loss
from mule.losses.mollm import mollm_loss
from mule.losses.npo import npo_loss
from mule.losses.rmu import rmu_loss
from mule.losses.sft import sft_loss
from mule.losses.simnpo import simnpo_loss

__all__ = ["bidirectional_topk_loss", "bild_loss", "duet_loss", "flat_loss", "ga_loss", "graddiff_loss",
           "mollm_loss", "npo_loss", "rmu_loss", "sft_loss", "simnpo_loss", "topk_smooth_l1"]
