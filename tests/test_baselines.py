"""The baselines: loss invariants, the gradient-combination strategies, and every method end to end on the tiny model."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mule import train as train_module
from mule.cli import main
from mule.config import load_config
from mule.losses import ga_loss, npo_loss, simnpo_loss
from mule.losses.flat import DIVERGENCES
from mule.losses.mgda import _frank_wolfe as fw
from mule.losses.mgda import common_descent, min_norm_weights
from mule.losses.ngdiff import fit_parabola, normalized_sum, update_lr
from mule.losses.projection import project_out
from mule.methods import METHODS, NEEDS, get_method, resolve
from mule.train import run_unlearn

ROOT = Path(__file__).resolve().parents[1]


def example_weights(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, example) for examples of the given lengths: w = 1 / (T_e * B), the loop's reduction."""
    example = torch.tensor([e for e, n in enumerate(lengths) for _ in range(n)])
    weights = torch.tensor([1.0 / (n * len(lengths)) for n in lengths for _ in range(n)])
    return weights, example


# ---- NPO, SimNPO, FLAT invariants ----

@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_npo_at_initialisation_is_2_ln2_over_beta_and_its_gradient_is_ga_on_the_summed_log_likelihood(beta):
    """With student = reference, r_e = 0: every forget example's loss is (2/beta) ln 2, so the batch mean is too.
    Its gradient is 2 sigmoid(0) grad log pi(y|x) = grad sum_t log p_t, whatever beta: GA's gradient with each
    example's mean over tokens replaced by the sum, i.e. T_e times GA's per-example gradient."""
    torch.manual_seed(0)
    lengths = [3, 1, 4]
    weights, example = example_weights(lengths)
    z = torch.randn(len(weights), 7, requires_grad=True)
    labels = torch.randint(0, 7, (len(weights),))
    forget = torch.ones(len(weights), dtype=torch.bool)
    reference = z.detach().float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    loss, _ = npo_loss(z, reference, labels, weights, example, forget, beta=beta, retain_weight=0.0)
    assert math.isclose(float(loss.detach()), 2 / beta * math.log(2), rel_tol=1e-6)
    (npo_grad,) = torch.autograd.grad(loss, z)
    scaled = weights * torch.tensor([float(lengths[e]) for e in example])  # W_e instead of W_e / T_e
    (ga_sum_grad,) = torch.autograd.grad(ga_loss(z, labels, scaled)[0], z)
    assert torch.allclose(npo_grad, ga_sum_grad, atol=1e-7)
    (ga_grad,) = torch.autograd.grad(ga_loss(z, labels, weights)[0], z)
    assert not torch.allclose(npo_grad, ga_grad, atol=1e-4)  # the scale factor is real...
    equal, ex2 = example_weights([3, 3])  # ...and with equal lengths T it is exactly T
    z2 = torch.randn(6, 7, requires_grad=True)
    ref2 = z2.detach().log_softmax(-1).gather(-1, labels[:6].unsqueeze(-1)).squeeze(-1)
    (g_npo,) = torch.autograd.grad(npo_loss(z2, ref2, labels[:6], equal, ex2, forget[:6], beta=beta)[0], z2)
    (g_ga,) = torch.autograd.grad(ga_loss(z2, labels[:6], equal)[0], z2)
    assert torch.allclose(g_npo, 3 * g_ga, atol=1e-7)


def logits_with_logprob(values: list[float]) -> torch.Tensor:
    """Rows [0, logit(e^a)] over two tokens, so that log p(token 1) = a exactly (a < 0)."""
    return torch.tensor([[0.0, a - math.log(-math.expm1(a))] for a in values], dtype=torch.float64)


def test_simnpo_margin_shifts_the_loss_along_the_mean_log_likelihood():
    """L(m, gamma) = -(2/beta) log sigmoid(-beta m - gamma) = L(m + gamma / beta, 0): a margin gamma acts like
    raising the forget answer's mean log-likelihood by gamma / beta, so it raises the loss."""
    beta, gamma = 0.7, 0.5
    logps = [-2.0, -1.0, -3.0]
    shifted = [a + gamma / beta for a in logps]
    weights, example = example_weights([3])
    labels, forget = torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.bool)
    with_margin = simnpo_loss(logits_with_logprob(logps), labels, weights, example, forget, beta=beta, gamma=gamma)[0]
    moved = simnpo_loss(logits_with_logprob(shifted), labels, weights, example, forget, beta=beta, gamma=0.0)[0]
    plain = simnpo_loss(logits_with_logprob(logps), labels, weights, example, forget, beta=beta, gamma=0.0)[0]
    assert math.isclose(float(with_margin), float(moved), rel_tol=1e-9)
    m = sum(logps) / 3
    assert math.isclose(float(plain), -(2 / beta) * math.log(1 / (1 + math.exp(beta * m))), rel_tol=1e-6)
    assert float(with_margin) > float(plain)


F_OF = {  # the generator f of each divergence (f-GAN, Nowozin et al. 2016)
    "tv": lambda u: 0.5 * (u - 1).abs(),
    "kl": lambda u: u * u.log(),
    "js": lambda u: u * u.log() - (u + 1) * ((u + 1) / 2).log(),
    "pearson": lambda u: (u - 1) ** 2,
}


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_flat_conjugate_is_the_convex_conjugate_on_the_activation_range(divergence):
    """f*(t) = sup_{u > 0} (t u - f(u)) for every t = g*(P), P in (0, 1): checked on a fine grid of u."""
    activation, conjugate = DIVERGENCES[divergence]
    u = torch.linspace(0.0, 20.0, 400_001, dtype=torch.float64)[1:]
    f = F_OF[divergence](u)
    for p in (0.02, 0.3, 0.5, 0.77, 0.98):
        t = activation(torch.tensor(p, dtype=torch.float64))
        numeric = float((t * u - f).max())
        assert math.isclose(float(conjugate(t)), numeric, rel_tol=1e-6, abs_tol=1e-7), (divergence, p)


def test_flat_loss_falls_when_the_template_gains_probability_and_the_forget_answer_loses_it():
    from mule.losses import flat_loss

    labels, ex = torch.tensor([1, 1]), torch.tensor([0, 0])
    w, good = torch.tensor([1.0, 1.0]), torch.tensor([True, False])
    for divergence in DIVERGENCES:
        before = flat_loss(logits_with_logprob([-1.0, -1.0]), labels, w, ex, good, divergence)[0]
        after = flat_loss(logits_with_logprob([-0.5, -2.0]), labels, w, ex, good, divergence)[0]
        assert float(after) < float(before), divergence


# ---- gradient-combination strategies ----

def test_ngdiff_direction_is_the_sum_of_unit_vectors():
    g1, g2, g3 = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 0.0, -2.0]), torch.tensor([1.0, 1.0, 1.0])
    expected = torch.tensor([0.6, 0.8, 0.0]) + torch.tensor([0.0, 0.0, -1.0]) + torch.ones(3) / math.sqrt(3)
    assert torch.allclose(normalized_sum([g1, g2, g3]), expected)
    assert torch.allclose(normalized_sum([10 * g1, 0.01 * g2, g3, torch.zeros(3)]), expected)  # scale-free


def test_autolr_fits_the_parabola_and_moves_towards_its_minimum():
    a, b, eta = 4.0, 2.0, 0.1  # delta(x) = 2 x^2 - 2 x, minimum at B / A = 0.5
    steps = [-eta, 0.0, eta]
    fa, fb, r2 = fit_parabola(steps, [a * x * x / 2 - b * x for x in steps])
    assert math.isclose(fa, a, rel_tol=1e-9) and math.isclose(fb, b, rel_tol=1e-9) and math.isclose(r2, 1.0)
    assert math.isclose(update_lr(eta, fa, fb, r2), 0.1 * 0.2 + 0.9 * 0.1)  # B/A = 0.5 clipped to 2 eta
    assert math.isclose(update_lr(0.4, fa, fb, r2), 0.1 * 0.5 + 0.9 * 0.4)  # inside [eta/2, 2 eta]: B/A itself
    assert update_lr(eta, -1.0, fb, r2) == eta / 2 and update_lr(eta, fa, -1.0, r2) == eta / 2
    assert update_lr(eta, fa, fb, 0.5) == eta / 2


def test_mgda_direction_has_a_non_negative_inner_product_with_every_normalised_gradient():
    torch.manual_seed(1)
    for m in (2, 3, 4, 5):
        for _ in range(20):
            grads = [torch.randn(40) * torch.rand(1) * 10 for _ in range(m)]
            d, lam = common_descent(grads)
            units = [g / g.norm() for g in grads]
            assert math.isclose(float(lam.sum()), 1.0, rel_tol=1e-9) and bool((lam >= 0).all())
            assert torch.allclose(d, sum(float(w) * u for w, u in zip(lam, units)), atol=1e-6)
            # d . u_i >= ||d||^2 >= 0: first-order descent for every objective, and (a zero duality gap) optimality
            for u in units:
                assert float(d @ u) >= float(d @ d) - 1e-5
    gram = torch.tensor([[1.0, -0.2, 0.3], [-0.2, 1.0, 0.1], [0.3, 0.1, 1.0]], dtype=torch.float64)
    exact, iterative = min_norm_weights(gram), fw(gram, 5000, 1e-14)  # the large-m fallback agrees
    assert math.isclose(float(exact @ gram @ exact), float(iterative @ gram @ iterative), rel_tol=1e-5)


def test_mgda_two_objectives_closed_form_and_conflict():
    """m = 2: lambda_1 = clip((u2 - u1) . u2 / ||u1 - u2||^2, 0, 1). Opposite gradients give d = 0."""
    u1, u2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.6, 0.8], dtype=torch.float64)
    lam = min_norm_weights(torch.tensor([[1.0, float(u1 @ u2)], [float(u1 @ u2), 1.0]]))
    expected = float((u2 - u1) @ u2 / ((u1 - u2) @ (u1 - u2)))
    assert math.isclose(float(lam[0]), expected, rel_tol=1e-9)
    d, _ = common_descent([torch.tensor([2.0, 1.0]), torch.tensor([-4.0, -2.0])])
    assert float(d.norm()) < 1e-6
    d, lam = common_descent([torch.tensor([1.0, 0.0]), torch.zeros(2)])  # a zero gradient is left out
    assert torch.allclose(d, torch.tensor([1.0, 0.0])) and lam.tolist() == [1.0, 0.0]


def test_projection_removes_the_retain_gradients_and_keeps_the_norm():
    torch.manual_seed(2)
    u, r1, r2 = torch.randn(30), torch.randn(30), torch.randn(30)
    d = project_out(u, [r1, r2])
    assert abs(float(d @ r1)) < 1e-4 and abs(float(d @ r2)) < 1e-4
    assert math.isclose(float(d.norm()), float(u.norm()), rel_tol=1e-5)
    orthogonal = torch.tensor([0.0, 0.0, 5.0])
    assert torch.allclose(project_out(orthogonal, [torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 1, 0])]), orthogonal)
    assert torch.allclose(project_out(u, []), u)


# ---- registry, configs, docs, CLI ----

def test_registry_declares_known_needs_and_resolves_defaults():
    for name, method in METHODS.items():
        assert set(method.needs) <= set(NEEDS), name
        assert method.paper and method.summary
    cfg = load_config(None, ["method.name=simnpo"]).method
    r = resolve(cfg)
    assert (r.objectives, r.npo_beta, r.retain_weight, r.forget_target) == ([1], 0.7, 0.1, "gold_answer")
    r = resolve(load_config(None, ["method.name=npo", "method.npo_beta=0.5", "method.objectives=[1, 3]"]).method)
    assert (r.objectives, r.npo_beta, r.retain_weight) == ([1, 3], 0.5, 1.0)
    assert resolve(load_config(None, []).method).objectives == [1, 2, 3]
    assert [n for n, m in METHODS.items() if m.objectives == (1,)] == ["ga", "simnpo", "flat"]


def test_obj1_only_methods_train_on_obj1_by_default_and_the_switch_works(tiny_bench):
    from mule.benchmark import load_benchmark
    from mule.train import select_records

    bench = load_benchmark(tiny_bench)
    ids = lambda *extra: sorted(r.id for r in select_records(bench, load_config(None, list(extra))))  # noqa: E731
    assert ids("method.name=ga") == ["f1", "f2", "f3", "f4", "p1"]  # forget-type records of Obj1
    assert ids("method.name=ga", "method.objectives=[1,2,3]") == ["a1", "a2", "f1", "f2", "f3", "f4", "p1", "p3", "p5"]
    assert ids("method.name=simnpo") == ["f1", "f2", "f3", "f4", "p1", "p2", "r1", "r2", "r3", "r4"]
    assert len(ids("method.name=npo")) == 19


def test_methods_command_lists_paper_and_needs(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, method in METHODS.items():
        assert f"\n{name} " in "\n" + out and method.paper in out
    assert "needs: labels, reference_logprobs" in out and "per_objective_gradients" in out and "objectives: 1" in out


def test_docs_list_every_method_with_an_existing_file():
    doc = (ROOT / "docs" / "methods.md").read_text()
    rows = {line.split("|")[1].strip().split()[0].strip("`"): line for line in doc.splitlines()
            if line.startswith("| `")}
    assert set(rows) == set(METHODS)
    for name, row in rows.items():
        files = [part.strip("` ") for part in row.split("|")[-2].split(",")]
        assert all((ROOT / f).is_file() for f in files), name


@pytest.mark.parametrize("grid, expected", [
    ("table1.yaml", ["ga", "simnpo", "flat", "sft", "ngdiff", "mollm", "duet", "bitopk"]),
    ("table2.yaml", ["bitopk", "bitopk_duet_loss", "bitopk_bild_loss"]),
])
def test_grid_configs_name_registered_methods(grid, expected, tmp_path):
    from mule.compare import GridConfig, unlearn_config

    path = ROOT / "configs" / grid
    assert path.read_text().startswith("# mule compare --config configs/" + grid)
    config = load_config(path, [], GridConfig)
    assert [m.name for m in config.methods] == expected and "base" in config.systems
    for m in config.methods:
        unlearn = unlearn_config(config, m, tmp_path / m.name)
        get_method(unlearn.method.name)
        resolve(unlearn.method)
    if grid == "table1.yaml":
        assert config.systems == ["base", "ensemble", "oracle"]


# ---- every method end to end on the tiny random model ----

# method -> (student forwards with grad, forwards of the frozen base, student forwards without grad, prefix
# forwards) in the two steps of a batch holding the whole training set. The first three count passes over the
# rows; a prefix forward runs a shared system part once (mule.modeling.ResponseLogits prefix mode). Teacher
# methods: one row pass per system per step, and the prompts' keys/values once (3 systems for oracle, 1 for
# ensemble); every student pass runs its system part once with it (not RMU: hidden states take it per row); NPO's
# reference pass reuses the base's keys/values of that system part, made once. NGDiff/MOLLM: one pass per
# objective (4) per step; NGDiff's learning-rate probe at step 1 evaluates the descent loss at three points.
EXPECTED_PASSES = {
    "bitopk": (2, 6, 0, 5), "duet": (2, 2, 0, 3), "bitopk_duet_loss": (2, 6, 0, 5), "bitopk_bild_loss": (2, 6, 0, 5),
    "sft": (2, 0, 0, 2), "ga": (2, 0, 0, 2), "graddiff": (2, 0, 0, 2), "npo": (2, 2, 0, 3), "simnpo": (2, 0, 0, 2),
    "flat": (2, 0, 0, 2), "ngdiff": (8, 0, 3, 11), "mollm": (8, 0, 0, 8), "mollm_proj": (8, 0, 0, 8),
    "rmu": (2, 2, 0, 0),
}
EXAMPLES = {"ga": 5, "flat": 5, "simnpo": 10}  # Obj1 only (GA and FLAT: forget-type records only); others 19


def run(tiny_model, tiny_bench, out, *extra):
    cfg = load_config(None, [f"model.name={tiny_model}", f"benchmark={tiny_bench}", f"output_dir={out}",
                             "train.epochs=2", "train.batch_size=32", "train.lr=1e-3", "train.warmup_steps=1",
                             "teacher.max_new_tokens=4", "method.layer=0", "teacher.leaks=keep", *extra])
    return run_unlearn(cfg)


def count_passes(monkeypatch) -> Counter:
    """Count decoder forwards by kind: over rows, the student (adapter on) with / without grad and the base (adapter
    off); and the forwards of a shared prefix alone."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from mule.modeling import causal_lm

    counts: Counter = Counter()
    real = train_module.make_student

    def counting(model, config, device, needs_teacher=True):
        student, teacher = real(model, config, device, needs_teacher)
        lora = next(m for m in student.modules() if isinstance(m, BaseTunerLayer))

        def hook(module, args, kwargs):
            if kwargs.get("attention_mask") is None:  # a shared prefix: no rows, no mask
                counts["prefix"] += 1
                return
            kind = "base" if lora.disable_adapters else ("student" if torch.is_grad_enabled() else "probe")
            counts[kind] += 1

        causal_lm(student).get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
        return student, teacher

    monkeypatch.setattr(train_module, "make_student", counting)
    return counts


def test_every_method_is_exercised():
    assert set(EXPECTED_PASSES) == set(METHODS)


@pytest.mark.parametrize("method", sorted(EXPECTED_PASSES))
def test_method_runs_two_steps_with_exactly_the_passes_it_needs(tiny_model, tiny_bench, tmp_path, monkeypatch, method):
    counts = count_passes(monkeypatch)
    out = run(tiny_model, tiny_bench, tmp_path / method, f"method.name={method}")
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and result["examples"] == EXAMPLES.get(method, 19)
    assert (counts["student"], counts["base"], counts["probe"], counts["prefix"]) == EXPECTED_PASSES[method]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in log)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    moved = {k for k, v in adapter.items() if "lora_B" in k and v.abs().sum() > 0}  # B starts at zero
    assert moved, "no weight changed"
    if method == "rmu":  # only layers up to the steered one (layer 0) can move its output: the rest stays frozen
        assert all(".layers.0." in k for k in moved) and any(".layers.1." in k for k in adapter)
    if get_method(method).combine:
        assert {f"loss/{g}" for g in ("retain", "neighbor", "forget", "adversarial")} <= set(log[0])
    else:  # both steps see the whole training set: the second step's loss is lower
        assert log[1]["loss"] < log[0]["loss"]
    if method == "ga":
        assert log[1]["forget_nll"] > log[0]["forget_nll"]
    if method == "npo":  # step 1 starts at the reference (r = 0); then the forget answers fall below it
        assert log[0]["log_ratio"] == 0.0 and log[1]["log_ratio"] < 0


def test_flat_pairs_each_forget_answer_with_a_refusal_template(tiny_model, tiny_bench, tmp_path, single_process):
    from mule.refusal import is_refusal
    from mule.train import setup

    cfg = load_config(None, [f"model.name={tiny_model}", f"benchmark={tiny_bench}", "method.name=flat"])
    _, tok, _, _, examples, _ = setup(cfg, tmp_path, single_process)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    assert {e.id for e in examples} == {"f1", "f2", "f3", "f4", "p1"}
    assert all(is_refusal(decode(e.template)) for e in examples)
    assert decode(next(e for e in examples if e.id == "f1").response) == "Tove Jansson."


@pytest.mark.parametrize("method, lr", [("ngdiff", 1e-2), ("mollm_proj", 1e-3), ("npo", 1e-3)])
def test_objective_gradients_and_group_means_are_invariant_to_accumulation(tiny_model, tiny_bench, tmp_path, method,
                                                                           lr):
    """Batch 8 in one micro-batch equals 2 micro-batches of 4: per-objective gradients and group means are
    accumulated over the whole optimiser batch (NGDiff's learning-rate probe included). The learning rates keep
    AdamW's amplification of float noise, and the noise in NGDiff's fitted curvature, below the tolerance."""
    runs = [run(tiny_model, tiny_bench, tmp_path / f"a{a}", f"method.name={method}", "train.batch_size=8",
                f"train.grad_accum={a}", "train.max_steps=3", "method.auto_lr_every=2", f"train.lr={lr}")
            for a in (1, 2)]
    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in runs)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    lrs = [[json.loads(x)["lr"] for x in (r / "train_log.jsonl").read_text().splitlines()] for r in runs]
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-5)


def test_ngdiff_resume_keeps_the_adaptive_learning_rate(tiny_model, tiny_bench, tmp_path, interrupt_after_checkpoint):
    # probes at steps 1 and 6: one before the interruption after step 4, one after the restart
    args = ["method.name=ngdiff", "train.batch_size=4", "train.save_every=2", "method.auto_lr_every=5",
            "train.max_steps=6", "train.lr=1e-2"]
    full = run(tiny_model, tiny_bench, tmp_path / "full", *args)
    arm, disarm = interrupt_after_checkpoint
    arm(4)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model, tiny_bench, tmp_path / "cut", *args)
    disarm()
    resumed = run(tiny_model, tiny_bench, tmp_path / "cut", *args)
    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lrs = [[json.loads(x)["lr"] for x in (r / "train_log.jsonl").read_text().splitlines()] for r in (full, resumed)]
    assert lrs[0] == lrs[1] and len(set(lrs[0])) > 1  # the learning rate did adapt, and survived the restart


def test_rmu_layer_out_of_range_is_a_clear_error(tiny_model, tiny_bench, tmp_path, capsys):
    args = [f"model.name={tiny_model}", f"benchmark={tiny_bench}", f"output_dir={tmp_path / 'r'}", "method.name=rmu",
            "method.layer=5", "train.max_steps=1"]
    assert main(["unlearn", *args]) == 2
    assert "method.layer=5 is not a decoder layer of this model (2 layers)" in capsys.readouterr().err


def test_full_finetuning_npo_uses_a_frozen_copy_as_reference(tiny_model, tiny_bench, tmp_path):
    out = run(tiny_model, tiny_bench, tmp_path / "full", "method.name=npo", "lora.enabled=false", "train.max_steps=2")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["log_ratio"] == 0.0 and log[1]["log_ratio"] != 0.0  # reference = the base, then they differ
    saved = yaml.safe_load((out / "config.yaml").read_text())["config"]["method"]
    assert saved["npo_beta"] == 0.1 and saved["objectives"] == [1, 2, 3]  # the resolved defaults are recorded


def test_refusal_templates_are_twenty_recognised_refusals():
    from mule.refusal import is_refusal
    from mule.targets import pick_refusal, refusal_templates

    templates = refusal_templates("I'm sorry, but I don't have any knowledge about that topic.")
    assert len(templates) == len(set(templates)) == 20 and all(is_refusal(t) for t in templates)
    assert refusal_templates("No.", "domain") == ["No."]
    picks = Counter(pick_refusal(f"id-{i}", templates) for i in range(400))
    assert len(picks) == 20 and pick_refusal("id-1", templates) == pick_refusal("id-1", templates)
