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


def test_centring_ignores_a_row_shift_of_the_teacher_and_raw_logits_do_not():
    """A system prompt shifts the prompted teacher's whole logit row; centred (log-probability) matching sees no
    difference when that shift is all there is, raw matching sees one in every index."""
    torch.manual_seed(0)
    student = torch.randn(3, 50)
    teacher = student + torch.tensor([[2.0], [5.0], [-1.5]])  # same distributions, shifted rows
    w = torch.full((3,), 1 / 3)
    for loss_fn in (bidirectional_topk_loss, duet_loss):
        assert float(loss_fn(student, teacher, w, k=5, center=True)[0]) < 1e-5
        assert float(loss_fn(student, teacher, w, k=5)[0]) > 1.0
    # and it is the log-probabilities that are matched: a real difference in distribution remains
    other = student.clone()
    other[:, 7] += 4.0
    centred = float(bidirectional_topk_loss(student, other, w, k=5, center=True)[0])
    by_hand = float(bidirectional_topk_loss(student.log_softmax(-1), other.log_softmax(-1), w, k=5)[0])
    assert centred > 0.1 and math.isclose(centred, by_hand, rel_tol=1e-5)


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


# ---- likelihood baselines: worked examples on a two-token vocabulary ----
# Row [0, ln 3] gives p = (1/4, 3/4); row [0, 0] gives (1/2, 1/2); row [ln 3, 0] gives (3/4, 1/4).
P34, P12, P34_0 = [0.0, math.log(3)], [0.0, 0.0], [math.log(3), 0.0]


def test_ga_worked_example():
    """Labels [1, 0] on rows p = 3/4 and p = 1/2, weights 1/2 each (one example of two tokens):

    L = 0.5 ln(3/4) + 0.5 ln(1/2) = -0.5 ln(8/3); dL/dz = w (onehot - softmax): row 0 = 0.5 ([0, 1] - [1/4, 3/4]).
    """
    from mule.losses import ga_loss

    z = torch.tensor([P34, P12], requires_grad=True)
    loss, metrics = ga_loss(z, torch.tensor([1, 0]), torch.tensor([0.5, 0.5]))
    assert math.isclose(float(loss.detach()), -0.5 * math.log(8 / 3), rel_tol=1e-6)
    assert math.isclose(metrics["forget_nll"], 0.5 * math.log(8 / 3), rel_tol=1e-6)
    loss.backward()
    assert torch.allclose(z.grad[0], torch.tensor([-0.125, 0.125]))


def test_graddiff_worked_example():
    """Forget token p = 3/4 (weight 1), retain token p = 1/2 (weight 1), lambda = 2:
    L = ln(3/4) - 2 ln(1/2) = ln 3."""
    from mule.losses import graddiff_loss

    z = torch.tensor([P34, P12])
    loss, metrics = graddiff_loss(z, torch.tensor([1, 0]), torch.ones(2), torch.tensor([True, False]), retain_weight=2.0)
    assert math.isclose(float(loss), math.log(3), rel_tol=1e-6)
    assert math.isclose(metrics["retain_nll"], math.log(2), rel_tol=1e-6)


def test_npo_worked_example():
    """Forget example (rows 0, 1; weights 1/2): log pi = ln(3/4) + ln(1/2), log pi_ref = 2 ln(1/2), so
    r = ln(3/2); beta = 1: -2 log sigmoid(-ln 1.5) = -2 log(1 / 2.5) = 2 ln 2.5. Retain example (row 2, p = 3/4,
    weight 1, lambda = 1) adds ln(4/3)."""
    from mule.losses import npo_loss

    z = torch.tensor([P34, P12, P34_0])
    ref = torch.tensor([math.log(0.5), math.log(0.5), math.log(0.5)])
    loss, metrics = npo_loss(z, ref, torch.tensor([1, 0, 0]), torch.tensor([0.5, 0.5, 1.0]), torch.tensor([0, 0, 1]),
                             torch.tensor([True, True, False]), beta=1.0, retain_weight=1.0)
    assert math.isclose(metrics["npo"], 2 * math.log(2.5), rel_tol=1e-6)
    assert math.isclose(float(loss), 2 * math.log(2.5) + math.log(4 / 3), rel_tol=1e-6)
    assert math.isclose(metrics["log_ratio"], math.log(1.5), rel_tol=1e-6)


def test_simnpo_worked_example():
    """Forget example of p = 3/4 and p = 1/2: m = (ln(3/4) + ln(1/2)) / 2 = 0.5 ln(3/8). beta = 2, gamma = 0:
    L = -(2/2) log sigmoid(-ln(3/8)) = -log((8/3) / (11/3)) = ln(11/8); gamma = ln 2: -log sigmoid(ln(4/3)) = ln(7/4).
    A retain token p = 3/4 with lambda = 0.1 adds 0.1 ln(4/3)."""
    from mule.losses import simnpo_loss

    z, labels = torch.tensor([P34, P12, P34_0]), torch.tensor([1, 0, 0])
    w, ex, f = torch.tensor([0.5, 0.5, 1.0]), torch.tensor([0, 0, 1]), torch.tensor([True, True, False])
    loss, metrics = simnpo_loss(z, labels, w, ex, f, beta=2.0, gamma=0.0, retain_weight=0.1)
    assert math.isclose(metrics["simnpo"], math.log(11 / 8), rel_tol=1e-6)
    assert math.isclose(float(loss), math.log(11 / 8) + 0.1 * math.log(4 / 3), rel_tol=1e-6)
    _, metrics = simnpo_loss(z, labels, w, ex, f, beta=2.0, gamma=math.log(2), retain_weight=0.1)
    assert math.isclose(metrics["simnpo"], math.log(7 / 4), rel_tol=1e-6)


def test_flat_worked_example_for_each_divergence():
    """One example: template answer of two tokens (p = 3/4, 1/2 -> P_e = 5/8), forget answer of one (P_f = 1/2).

    L = -g*(P_e) + f*(g*(P_f)):  tv: -tanh(5/8)/2 + tanh(1/2)/2;  kl: -5/8 + exp(1/2 - 1);
    js: -(ln 2 - ln(1 + e^-5/8)) - ln(2 - 2 / (1 + e^-1/2));  pearson: -5/8 + (1/2)^2 / 4 + 1/2.
    """
    from mule.losses import flat_loss

    z = torch.tensor([P34, P12, P12])
    labels, ex = torch.tensor([1, 0, 0]), torch.tensor([0, 0, 0])
    w = torch.tensor([0.5, 0.5, 1.0])
    good = torch.tensor([True, True, False])
    pe, pf = 5 / 8, 1 / 2
    expected = {
        "tv": -math.tanh(pe) / 2 + math.tanh(pf) / 2,
        "kl": -pe + math.exp(pf - 1),
        "js": -(math.log(2) - math.log(1 + math.exp(-pe))) - math.log(2 - 2 / (1 + math.exp(-pf))),
        "pearson": -pe + pf * pf / 4 + pf,
    }
    for divergence, value in expected.items():
        loss, metrics = flat_loss(z, labels, w, ex, good, divergence=divergence)
        assert math.isclose(float(loss), value, rel_tol=1e-6, abs_tol=1e-6), divergence
        assert math.isclose(metrics["p_template"], pe, rel_tol=1e-6) and math.isclose(metrics["p_forget"], pf)


def test_mollm_uce_worked_example():
    """Forget token p = 1/2: UCE = -ln(1 - 1/4) = ln(4/3); retain token p = 3/4: NLL = ln(4/3); weights 1."""
    from mule.losses import mollm_loss

    z = torch.tensor([P12, P34])
    loss, metrics = mollm_loss(z, torch.tensor([0, 1]), torch.ones(2), torch.tensor([True, False]))
    assert math.isclose(metrics["uce"], math.log(4 / 3), rel_tol=1e-6)
    assert math.isclose(float(loss), 2 * math.log(4 / 3), rel_tol=1e-6)


def test_uce_is_bounded_and_vanishes_at_zero_probability():
    from mule.losses.mollm import unlearning_cross_entropy

    logp = torch.tensor([0.0, -1e-6, -50.0])
    uce = unlearning_cross_entropy(logp)
    assert math.isclose(float(uce[0]), math.log(2), rel_tol=1e-6) and float(uce[2]) < 1e-20


def test_rmu_worked_example():
    """H = 2, control c u = [3, 4]. Forget row h = [1, 2]: mean((1-3)^2, (2-4)^2) = 4. Retain row h = [1, 1],
    h_ref = [0, 3]: mean(1, 4) = 2.5. Weights 1, alpha = 2: L = 4 + 2 * 2.5 = 9. The forget row's reference is unused."""
    from mule.losses import rmu_loss

    h = torch.tensor([[1.0, 2.0], [1.0, 1.0]], requires_grad=True)
    ref = torch.tensor([[float("nan"), 0.0], [0.0, 3.0]])
    loss, metrics = rmu_loss(h, ref, torch.tensor([3.0, 4.0]), torch.ones(2), torch.tensor([True, False]),
                             retain_weight=2.0)
    assert math.isclose(float(loss.detach()), 9.0) and metrics == {"misdirect": 4.0, "retain_mse": 2.5}
    loss.backward()
    # d/dh of mean_j (h_j - t_j)^2 = (h - t); forget row: [-2, -2]; retain row: 2 * [1, -2]
    assert torch.allclose(h.grad, torch.tensor([[-2.0, -2.0], [2.0, -4.0]]))


def test_rmu_control_vector():
    from mule.losses.rmu import control_vector

    c = control_vector(16, 6.5, seed=3)
    assert math.isclose(float(c.norm()), 6.5, rel_tol=1e-6) and bool((c >= 0).all())
    assert torch.equal(c, control_vector(16, 6.5, seed=3)) and not torch.equal(c, control_vector(16, 6.5, seed=4))


def test_likelihood_losses_give_masked_positions_zero_gradient():
    from mule.losses import flat_loss, ga_loss, graddiff_loss, mollm_loss, npo_loss, simnpo_loss

    z = torch.randn(6, 5, requires_grad=True)
    labels = torch.randint(0, 5, (6,))
    w = torch.tensor([0.25, 0.0, 0.25, 0.5, 0.0, 0.5])
    ex = torch.tensor([0, 0, 0, 1, 1, 1])
    f = torch.tensor([True, True, True, False, False, False])
    good = torch.tensor([True, True, False, True, True, False])
    ref = torch.randn(6)
    for fn in (lambda: ga_loss(z, labels, w), lambda: graddiff_loss(z, labels, w, f),
               lambda: npo_loss(z, ref, labels, w, ex, f), lambda: simnpo_loss(z, labels, w, ex, f),
               lambda: mollm_loss(z, labels, w, f), lambda: flat_loss(z, labels, w, ex, good)):
        z.grad = None
        fn()[0].backward()
        assert torch.all(z.grad[1] == 0) and torch.all(z.grad[4] == 0)
        assert z.grad[0].abs().sum() > 0
