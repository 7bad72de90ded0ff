"""Hand-worked checks and invariants for every distillation loss."""

import math

import torch
import torch.nn.functional as F

from mule.losses import bidirectional_topk_loss, bild_loss, duet_loss
from mule.losses.bild import logit_difference_kl


def sl1(d, beta=1.0):
    d = abs(d)
    return 0.5 * d * d / beta if d < beta else d - 0.5 * beta


def test_bitopk_worked_example():
    """V = 4, K = 2, alpha = 0.5, beta = 1, one position with weight 1.

    teacher z^R = [3, 0, 2, -1] -> C^R = {0, 2};  student z^S = [1, 4, 2, 0] -> C^S = {1, 2}.
    imitate  = SL1(1-3) + SL1(2-2) = (2 - 0.5) + 0 = 1.5
    suppress = SL1(4-0) + SL1(2-2) = (4 - 0.5) + 0 = 3.5
    loss = 1.5 + 0.5 * 3.5 = 3.25
    """
    s = torch.tensor([[1.0, 4.0, 2.0, 0.0]], requires_grad=True)
    t = torch.tensor([[3.0, 0.0, 2.0, -1.0]])
    loss, metrics = bidirectional_topk_loss(s, t, torch.ones(1), k=2, alpha=0.5, beta=1.0)
    assert math.isclose(float(loss.detach()), 3.25)
    assert math.isclose(metrics["imitate"], 1.5) and math.isclose(metrics["suppress"], 3.5)
    loss.backward()
    # d/dz0 = sign(1-3) = -1 (linear part); d/dz1 = 0.5 * sign(4-0) = 0.5; z2 has zero difference; z3 unused
    assert torch.allclose(s.grad, torch.tensor([[-1.0, 0.5, 0.0, 0.0]]))


def test_bitopk_quadratic_region_and_overlap_counts_twice():
    """Small differences use 0.5 d^2 / beta; an index in both sets counts 1 + alpha times.

    z^R = [1, 0.5, 0], z^S = [1.2, 0.1, 0]; K = 1: C^R = C^S = {0}; d = 0.2, beta = 0.5:
    SL1 = 0.5 * 0.04 / 0.5 = 0.04; loss = (1 + 2) * 0.04 = 0.12 with alpha = 2.
    """
    s = torch.tensor([[1.2, 0.1, 0.0]])
    t = torch.tensor([[1.0, 0.5, 0.0]])
    loss, _ = bidirectional_topk_loss(s, t, torch.ones(1), k=1, alpha=2.0, beta=0.5)
    assert math.isclose(float(loss), 0.12, rel_tol=1e-6)


def test_student_equals_teacher_gives_zero_loss():
    z = torch.randn(5, 11)
    w = torch.full((5,), 0.2)
    for loss, _ in (bidirectional_topk_loss(z, z, w, k=3), duet_loss(z, z, w, k=3), bild_loss(z, z, w, k=4)):
        assert float(loss) == 0.0


def test_masked_positions_get_zero_gradient():
    s = torch.randn(4, 9, requires_grad=True)
    t = torch.randn(4, 9)
    w = torch.tensor([0.5, 0.0, 0.5, 0.0])
    for fn in (lambda: bidirectional_topk_loss(s, t, w, k=3)[0], lambda: duet_loss(s, t, w, k=3)[0],
               lambda: bild_loss(s, t, w, k=3)[0]):
        s.grad = None
        fn().backward()
        assert torch.all(s.grad[1] == 0) and torch.all(s.grad[3] == 0)
        assert s.grad[0].abs().sum() > 0


def test_k_equal_vocab_is_dense_smooth_l1():
    """With K = V both index sets are the whole vocabulary: loss = (1 + alpha) * dense Smooth-L1 sum."""
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    w = torch.full((3,), 1 / 3)
    loss, _ = bidirectional_topk_loss(s, t, w, k=7, alpha=0.7, beta=1.0)
    dense = F.smooth_l1_loss(s, t, reduction="none", beta=1.0).sum(-1).mean() * 1.7
    assert torch.allclose(loss, dense, atol=1e-6)


def test_duet_is_bitopk_with_alpha_zero():
    s, t = torch.randn(6, 20), torch.randn(6, 20)
    w = torch.rand(6)
    assert torch.allclose(duet_loss(s, t, w, k=5)[0], bidirectional_topk_loss(s, t, w, k=5, alpha=0.0)[0])


def test_teacher_gets_no_gradient():
    s = torch.randn(2, 6, requires_grad=True)
    t = torch.randn(2, 6, requires_grad=True)
    bidirectional_topk_loss(s, t, torch.ones(2), k=2)[0].backward()
    assert t.grad is None


def test_bild_worked_example():
    """k = 2 gives a single pair, so the softmax over pairs is 1 and LD = 0 whatever the logits.

    k = 3, tau = 1, teacher top-3 ordered [a, b, c]: pairs (a-b, a-c, b-c).
    Teacher logits [2, 1, 0] -> diffs [1, 2, 1]; student [0, 0, 0] -> diffs [0, 0, 0] (uniform).
    p^R = softmax([1, 2, 1]) = [e, e^2, e] / (2e + e^2); KL(p^R || uniform) = sum p log p + log 3.
    """
    s = torch.zeros(1, 3)
    t = torch.tensor([[2.0, 1.0, 0.0]])
    assert float(logit_difference_kl(s, t, torch.tensor([[0, 1]]), tau=1.0)) == 0.0
    e = math.e
    z = 2 * e + e * e
    p = [e / z, e * e / z, e / z]
    expected = sum(q * math.log(q) for q in p) + math.log(3)
    got = float(logit_difference_kl(s, t, torch.tensor([[0, 1, 2]]), tau=1.0))
    assert math.isclose(got, expected, rel_tol=1e-5)
    # student == 0 has ties, so its top-3 is also {0, 1, 2} in some order: the s-LD term adds a KL of the same
    # distributions up to the order of the pairs; the total is t-LD + s-LD >= t-LD
    loss, metrics = bild_loss(s, t, torch.ones(1), k=3, tau=1.0)
    assert math.isclose(metrics["t_ld"], expected, rel_tol=1e-5)
    assert float(loss) >= expected - 1e-6


def test_bild_temperature_softens():
    s, t = torch.randn(4, 10), torch.randn(4, 10) * 3
    w = torch.full((4,), 0.25)
    assert float(bild_loss(s, t, w, k=5, tau=10.0)[0]) < float(bild_loss(s, t, w, k=5, tau=1.0)[0])


def test_sft_worked_example():
    """Two positions, V = 2, weights 0.5 each: z = [0, ln 3] -> p(1) = 3/4; z = [0, 0] -> p(0) = 1/2.

    targets [1, 0]: L = -0.5 ln(3/4) - 0.5 ln(1/2) = 0.5 (ln 4/3 + ln 2) = 0.5 ln(8/3).
    """
    from mule.losses import sft_loss

    z = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]], requires_grad=True)
    loss, metrics = sft_loss(z, torch.tensor([1, 0]), torch.tensor([0.5, 0.5]))
    assert math.isclose(float(loss.detach()), 0.5 * math.log(8 / 3), rel_tol=1e-6)
    loss.backward()
    # dL/dz = w (softmax - onehot): row 0: 0.5 * ([1/4, 3/4] - [0, 1]) = [0.125, -0.125]
    assert torch.allclose(z.grad[0], torch.tensor([0.125, -0.125]))
    assert metrics["token_acc"] == 1.0
