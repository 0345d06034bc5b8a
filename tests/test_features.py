"""Feature distillation: hooks, FitNet / AT / RKD against float64 references, adapters, and the module's wiring."""

from __future__ import annotations

import copy
import itertools
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillationModule, Speed
from lightning_kd.features import FeatureTerm
from lightning_kd.hooks import FeatureHooks, canonical_name, resolve_modules
from lightning_kd.losses import (
    ATLoss,
    DKDLoss,
    FitNetLoss,
    LearnableTemperature,
    RKDLoss,
    at_loss,
    build_adapter,
    cross_entropy_loss,
    fitnet_loss,
    kd_loss,
    rkd_loss,
)
from lightning_kd.models import get_model
from lightning_kd.teachers import TeacherEnsemble, load_teacher


def fitnet() -> dict[str, FeatureTerm]:
    return {"fitnet": FeatureTerm(FitNetLoss(), "features.3", "hidden.1", weight=10.0)}


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def trainer(**kwargs) -> L.Trainer:
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=1)
    return L.Trainer(**{**options, **kwargs})


def loader(n=32, batch_size=8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)), batch_size=batch_size)


# ------------------------------------------------------------------ hooks
def test_captured_features_equal_a_manual_forward():
    cnn, mlp = get_model("cnn1d").eval(), get_model("mlp").eval()
    x = torch.randn(4, 40)
    with FeatureHooks(cnn, ["features.1", "features.3", "classifier"]) as hooks:
        out = cnn(x)
        manual = cnn.features[:2](x.unsqueeze(1))
        assert torch.equal(hooks["features.1"], manual)
        assert torch.equal(hooks["features.3"], cnn.features[2:](manual))
        assert torch.equal(hooks["classifier"], out)
    with FeatureHooks(mlp, ["hidden.1"], capture="input") as hooks:
        mlp(x)
        assert torch.equal(hooks["hidden.1"], mlp.hidden[0](x))  # the input of hidden.1 = the output of hidden.0
    assert all_hooks(cnn) == 0 and all_hooks(mlp) == 0


def test_wrapper_prefixes_are_accepted_and_unknown_names_list_close_matches():
    model = get_model("cnn1d")
    assert canonical_name("module._orig_mod.features.2") == "features.2"
    wrapped = nn.DataParallel(model)  # named_modules(): "module.features.2", as under DDP
    compiled = torch.compile(model)  # lazily compiled: named "_orig_mod.features.2"
    for outer, name in ((wrapped, "module.features.2"), (compiled, "_orig_mod.features.2"), (model, "module.features.2")):
        assert resolve_modules(outer, [name])[name] is model.features[2]
    with pytest.raises(ValueError, match=r"Unknown layer 'features.20'.*Did you mean: features.2"):
        resolve_modules(model, ["features.20"])
    with pytest.raises(ValueError, match=r"Unknown teacher layer 'hiden.1'.*Did you mean: hidden.1"):
        resolve_modules(get_model("mlp"), ["hiden.1"], setting="teacher layer")


def test_a_layer_that_did_not_run_is_a_clear_error():
    model = get_model("mlp")
    hooks = FeatureHooks(model, ["hidden.0"])
    with pytest.raises(RuntimeError, match="has not run"):
        hooks["hidden.0"]
    with pytest.raises(KeyError, match="is not hooked"):
        hooks["classifier"]
    hooks.remove()
    assert all_hooks(model) == 0


@pytest.mark.slow
def test_hooks_capture_inside_a_compiled_student():
    model = get_model("cnn1d").eval()
    x = torch.randn(4, 40)
    eager = model.features[:3](x.unsqueeze(1))
    hooks = FeatureHooks(model, ["features.2"])
    model.compile()  # in place, as `compile_student=True` does
    model(x)
    torch.testing.assert_close(hooks["features.2"], eager)
    hooks.remove()
    assert all_hooks(model) == 0


# ------------------------------------------------------------------ feature losses vs float64
def test_fitnet_is_the_elementwise_mse():
    s, t = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    ref = sum((a - b) ** 2 for a, b in zip(s.double().flatten().tolist(), t.double().flatten().tolist())) / s.numel()
    assert fitnet_loss(s, t).item() == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match=r"adapted student feature to have the teacher feature's shape"):
        fitnet_loss(torch.randn(3, 4), torch.randn(3, 5))


def ref_attention(f, p=2.0):
    """Per sample: mean over channels of |f|^p at each position, L2-normalised, in float64."""
    out = []
    for sample in f.double().tolist():
        positions = list(zip(*[list(itertools.chain.from_iterable(c)) if isinstance(c[0], list) else c for c in sample]))
        a = [sum(abs(v) ** p for v in pos) / len(pos) for pos in positions]
        norm = math.sqrt(sum(v * v for v in a))
        out.append([v / max(norm, 1e-12) for v in a])
    return out


@pytest.mark.parametrize("shape_s, shape_t", [((3, 4, 6), (3, 8, 6)), ((2, 3, 4, 5), (2, 6, 4, 5))])
def test_attention_transfer_matches_float64_reference(shape_s, shape_t):
    s, t = torch.randn(shape_s), torch.randn(shape_t)
    a_s, a_t = ref_attention(s), ref_attention(t)
    n = sum(len(r) for r in a_s)
    ref = sum((x - y) ** 2 for rs, rt in zip(a_s, a_t) for x, y in zip(rs, rt)) / n
    assert at_loss(s, t).item() == pytest.approx(ref, rel=1e-5)


def test_attention_transfer_pools_larger_maps_and_refuses_vectors():
    s, t = torch.randn(2, 3, 10), torch.randn(2, 5, 5)
    pooled = torch.nn.functional.avg_pool1d(s, 2)
    assert at_loss(s, t).item() == pytest.approx(at_loss(pooled, t).item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs spatial feature maps"):
        at_loss(torch.randn(2, 100), torch.randn(2, 64, 5))


def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def ref_rkd(s, t, wd, wa):
    s = [r for r in s.double().flatten(1).tolist()]
    t = [r for r in t.double().flatten(1).tolist()]
    n = len(s)

    def dist(e):
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    def angles(e):
        out = []
        for i, j, k in itertools.product(range(n), repeat=3):
            u = [a - b for a, b in zip(e[j], e[i])]
            v = [a - b for a, b in zip(e[k], e[i])]
            nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
            out.append(0.0 if nu == 0 or nv == 0 else sum(x * y for x, y in zip(u, v)) / (nu * nv))
        return out

    ds, dt = dist(s), dist(t)
    distance = sum(smooth_l1(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / (n * n)
    angle = sum(smooth_l1(a, b) for a, b in zip(angles(s), angles(t))) / n**3
    return wd * distance + wa * angle


def test_rkd_matches_float64_reference_and_ignores_widths():
    s, t = torch.randn(6, 5), torch.randn(6, 2, 4)
    assert rkd_loss(s, t).item() == pytest.approx(ref_rkd(s, t, 25.0, 50.0), rel=1e-4)
    assert rkd_loss(s, t, distance_weight=1.0, angle_weight=0.0).item() == pytest.approx(ref_rkd(s, t, 1.0, 0.0), rel=1e-4)
    s.requires_grad_(True)
    rkd_loss(s, t).backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize(
    "student, teacher, kind",
    [
        ((4, 100), (4, 64), nn.Linear),
        ((4, 8, 5), (4, 64, 5), nn.Conv1d),
        ((4, 8, 6, 6), (4, 16, 3, 3), nn.Sequential),  # 1x1 conv, then pooled to 3x3
        ((4, 100), (4, 64, 5), nn.Sequential),  # flatten, linear, unflatten
    ],
)
def test_adapters_map_student_shapes_to_teacher_shapes(student, teacher, kind):
    adapter = build_adapter(student, teacher)
    assert isinstance(adapter, kind)
    assert adapter(torch.randn(student)).shape == teacher


# ------------------------------------------------------------------ the module's feature terms
def test_fitnet_adapters_are_built_trained_and_kept_out_of_the_student(tmp_path):
    L.seed_everything(0)
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"), features=fitnet())
    assert len(module.feature_distillation.adapters) == 0  # built from a dry forward at the start of fit
    fit = trainer(max_epochs=2, default_root_dir=tmp_path, enable_checkpointing=True)
    fit.fit(module, loader())
    adapter = module.feature_distillation.adapters["fitnet_0"]
    assert module.feature_distillation.adapter_shapes == {"fitnet_0": ([8, 100], [8, 64, 5], "channels_first")}  # the first batch's
    # trained with the student: in its optimizer
    optimized = {id(p) for g in fit.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in optimized for p in adapter.parameters())
    assert "train/feature_fitnet" in fit.callback_metrics
    # not part of the student, in the module's checkpoint, and no hook left after fit
    assert not any("adapter" in k for k in module.student.state_dict())
    assert all_hooks(module.student) == 0 and all_hooks(module.teacher) == 0
    ckpt = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    assert "feature_distillation.adapters.fitnet_0.1.weight" in state["state_dict"]
    # `load_from_checkpoint` has no dry forward: the adapters come back from the shapes the checkpoint records
    restored = DistillationModule.load_from_checkpoint(ckpt, teacher=module.teacher, student=get_model("mlp"), features=fitnet(),
                                                       weights_only=True)
    for key, value in module.feature_distillation.adapters.state_dict().items():
        assert torch.equal(restored.feature_distillation.adapters.state_dict()[key], value)
    # the feature terms are not in the checkpoint (weights only): leaving them out is a loud error naming them, not a silent drop
    with pytest.raises(ValueError, match=r"features: trained with \{'fitnet': \"FeatureTerm\(FitNetLoss\(adapter='auto'\), teacher_layers=\['features.3'\]"):
        DistillationModule.load_from_checkpoint(ckpt, teacher=module.teacher, student=get_model("mlp"))


def test_feature_loss_in_the_training_step_equals_the_functional_one():
    L.seed_everything(0)
    teacher, student = get_model("cnn1d").eval(), get_model("mlp")
    terms = {"rkd": FeatureTerm(RKDLoss(), "features.3", "hidden.1", weight=2.0),
             "hint": FeatureTerm(FitNetLoss(), ["features.2"], ["hidden.0"])}
    module = DistillationModule(teacher, student, features=terms, alpha=0.5)
    module.example_input_array = torch.randn(2, 40)
    module.setup("fit")  # attaches the hooks, builds the adapter from a dry forward
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        t_out, t3, t2 = teacher(x), teacher.features[:4](x.unsqueeze(1)), teacher.features[:3](x.unsqueeze(1))
    s0 = student.hidden[0](x)
    s1 = student.hidden[1](s0)
    s_out = student.classifier(s1)
    expected = 0.5 * kd_loss(s_out, t_out, 4.0) + 0.5 * cross_entropy_loss(s_out, y)
    expected = expected + 2.0 * rkd_loss(s1, t3) + fitnet_loss(module.feature_distillation.adapters["hint_0"](s0), t2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    module.teardown("fit")
    assert all_hooks(student) == 0 and all_hooks(teacher) == 0


@pytest.mark.parametrize(
    "features, error, match",
    [
        (lambda: {"fitnet": FeatureTerm(FitNetLoss(), "features.9", "hidden.1")}, ValueError, "Unknown teacher layer 'features.9'"),
        (lambda: {"at": FeatureTerm(ATLoss(), "features.1", "hiden.0")}, ValueError, "Unknown student layer 'hiden.0'.*Did you mean: hidden.0"),
        (lambda: {"crd": {"teacher_layers": ["features.1"], "student_layers": ["hidden.0"]}}, TypeError,
         r"Expected `features\['crd'\]` to be a FeatureTerm\(loss, teacher_layers, student_layers, weight\), but got dict"),
        (lambda: {"fitnet": FeatureTerm(FitNetLoss(), ["features.1", "features.2"], ["hidden.0"])}, ValueError, "as many `teacher_layers`"),
        (lambda: {"rkd": FeatureTerm(RKDLoss(angle=1), "features.1", "hidden.0")}, TypeError, r"unexpected keyword argument 'angle'"),
        (lambda: {"fitnet": FeatureTerm(FitNetLoss(), [], ["hidden.0"])}, ValueError, "`teacher_layers` to be a layer name or a non-empty list"),
    ],
    ids=["unknown_teacher_layer", "misspelt_student_layer", "not_a_feature_term", "unpaired_layers", "unknown_loss_option", "no_layer"],
)
def test_bad_feature_settings_are_refused_at_construction(features, error, match):
    with pytest.raises(error, match=match):
        DistillationModule(get_model("cnn1d"), get_model("mlp"), features=features())


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: FeatureTerm(FitNetLoss(), ["features.1", "features.2"], "hidden.0"), ValueError,
         r"Expected as many `teacher_layers` as `student_layers` \(they pair up in order\), but got 2 and 1"),
        (lambda: FeatureTerm(ATLoss(), "features.1", "hidden.0", weight=-1.0), ValueError,
         r"Expected the feature term's `weight` to be a finite number >= 0, but got -1.0"),
        (lambda: FeatureTerm(ATLoss(), "features.1", "hidden.0", weight=math.nan), ValueError, r"`weight` to be a finite number >= 0, but got nan"),
        (lambda: FeatureTerm("fitnet", "features.1", "hidden.0"), TypeError, r"`loss` to be a module or callable .* but got str"),
        (lambda: FeatureTerm(ATLoss(), "features.1", []), ValueError, r"Expected `student_layers` to be a layer name or a non-empty list of them"),
        (lambda: FeatureTerm(ATLoss(), [1], ["hidden.0"]), ValueError, r"Expected `teacher_layers` to be a layer name or a non-empty list"),
    ],
    ids=["unpaired", "negative_weight", "nan_weight", "loss_by_name", "no_student_layer", "layer_not_a_name"],
)
def test_feature_term_validates_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_feature_term_pairs_layers_in_order_and_any_callable_is_a_loss():
    term = FeatureTerm(FitNetLoss(), "features.3", "hidden.1", weight=100.0)
    assert repr(term) == "FeatureTerm(FitNetLoss(adapter='auto'), teacher_layers=['features.3'], student_layers=['hidden.1'], weight=100.0)"
    assert term.needs_adapters and not FeatureTerm(ATLoss(), "features.1", "hidden.0").needs_adapters

    def mean_match(s, t):  # a user's own term: student and teacher mean activations per sample
        return (s.mean(1) - t.flatten(1).mean(1)).pow(2).mean()

    L.seed_everything(0)
    teacher, student = get_model("cnn1d").eval(), get_model("mlp")
    terms = {"mean": FeatureTerm(mean_match, "features.3", "hidden.1", weight=3.0),
             "off": FeatureTerm(RKDLoss(), "features.1", "hidden.0", weight=0.0)}
    module = DistillationModule(teacher, student, features=terms, alpha=0.5)
    module.log = lambda *a, **k: None
    module.setup("fit")
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        t_out, t3 = teacher(x), teacher.features[:4](x.unsqueeze(1))
    s1 = student.hidden[1](student.hidden[0](x))
    expected = 0.5 * kd_loss(student.classifier(s1), t_out, 4.0) + 0.5 * cross_entropy_loss(student.classifier(s1), y) + 3.0 * mean_match(s1, t3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)  # a weight of 0 adds nothing
    module.teardown("fit")


def test_feature_terms_need_an_online_teacher():
    with pytest.raises(ValueError, match="Feature terms need the teacher's activations"):
        DistillationModule(None, get_model("mlp"), features=fitnet())


# ------------------------------------------------------------------ several teachers
def test_two_teachers_average_their_logits_and_each_stays_frozen(tmp_path):
    L.seed_everything(0)
    a, b = get_model("cnn1d"), get_model("cnn1d")
    a.train(), b.train()
    module = DistillationModule({"a": a, "b": b}, get_model("mlp"), teacher_weights={"a": 3.0, "b": 1.0})
    x = torch.randn(5, 40)
    torch.testing.assert_close(module.teacher_forward(x), 0.75 * a(x) + 0.25 * b(x))
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    fit = trainer(max_epochs=1, default_root_dir=tmp_path, enable_checkpointing=True)
    fit.fit(module, loader())
    for key, value in module.teacher.state_dict().items():  # weights and BatchNorm buffers of both
        assert torch.equal(value, before[key]), key
    assert not a.training and not b.training
    assert not any(p.requires_grad for p in module.teacher.parameters())
    optimized = {id(p) for g in fit.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}
    state = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    assert not any(k.startswith("teacher.") for k in state["state_dict"])


def test_each_teacher_on_its_own_precision():
    a, b = get_model("cnn1d").eval(), get_model("cnn1d").eval()
    module = DistillationModule([a, b], get_model("mlp"), speed=Speed(teacher_dtype={"1": "bfloat16"}))
    assert next(a.parameters()).dtype == torch.float32 and next(b.parameters()).dtype == torch.bfloat16
    x = torch.randn(4, 40)
    out = module.teacher_forward(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, 0.5 * a(x) + 0.5 * b(x.bfloat16()).float())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (lambda: {"teacher_weights": [1.0]}, r"Expected 2 `teacher_weights` \(one per teacher\), but got 1"),
        (lambda: {"teacher_weights": [0.0, 0.0]}, "non-negative `teacher_weights` with a positive sum"),
        (lambda: {"speed": Speed(teacher_dtype={"2": "bfloat16"})}, "names teacher '2', but the teachers are 0, 1"),
        (lambda: {"speed": Speed(teacher_dtype={"0": "fp8"})}, "Unknown `teacher_dtype` 'fp8'"),
        (lambda: {"teacher_checkpoint": [None]}, r"Expected 2 teacher checkpoints \(one per teacher, None to keep one as given\), but got 1"),
        (lambda: {"teacher_checkpoint": {"2": None}}, r"`teacher_checkpoint` names teachers \['2'\], but the teachers are 0, 1"),
        (lambda: {"teacher_checkpoint": "teacher.pt"}, "Several teachers need one checkpoint each"),
    ],
    ids=["weights_count", "weights_zero_sum", "dtype_unknown_member", "dtype_unknown_name", "checkpoint_count", "checkpoint_unknown_member",
         "one_checkpoint"],
)
def test_bad_ensemble_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationModule([get_model("cnn1d"), get_model("cnn1d")], get_model("mlp"), **kwargs())


def test_load_teacher_builds_a_weighted_ensemble_each_member_from_its_checkpoint(tmp_path):
    a, b = get_model("cnn1d"), get_model("cnn1d", channels=8)  # members need not share an architecture
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    fresh_a, fresh_b = get_model("cnn1d").train(), get_model("cnn1d", channels=8).train()
    ensemble = load_teacher([fresh_a, fresh_b], [tmp_path / "a.pt", str(tmp_path / "b.pt")], weights=[3, 1])
    assert isinstance(ensemble, TeacherEnsemble) and ensemble.weights == {"0": 0.75, "1": 0.25}
    for member, source in ((ensemble["0"], a), (ensemble["1"], b)):
        for key, value in source.state_dict().items():  # weights and BatchNorm buffers
            assert torch.equal(member.state_dict()[key], value), key
    assert not any(m.training for m in ensemble.modules())
    assert not any(p.requires_grad for p in ensemble.parameters())
    x = torch.randn(5, 40)
    torch.testing.assert_close(ensemble(x), 0.75 * a.eval()(x) + 0.25 * b.eval()(x))

    given = get_model("cnn1d")  # a dict by name; None keeps a member's weights as given
    kept = {k: v.clone() for k, v in given.state_dict().items()}
    by_name = load_teacher({"a": get_model("cnn1d"), "given": given}, {"a": tmp_path / "a.pt", "given": None})
    assert by_name.weights == {"a": 0.5, "given": 0.5}
    assert torch.equal(by_name["a"].classifier.weight, a.classifier.weight)
    assert all(torch.equal(given.state_dict()[k], v) for k, v in kept.items())

    with pytest.raises(ValueError, match=r"Expected 2 teacher checkpoints \(one per teacher, None to keep one as given\), but got 3"):
        load_teacher([get_model("cnn1d"), get_model("cnn1d")], [tmp_path / "a.pt"] * 3)


def test_an_ensemble_run_reloads_its_teachers_from_the_recorded_checkpoints(tmp_path):
    a, b = get_model("cnn1d"), get_model("cnn1d")
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    paths = [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]
    module = DistillationModule([get_model("cnn1d"), get_model("cnn1d")], get_model("mlp"), teacher_checkpoint=paths, teacher_weights=[3, 1])
    fit = trainer(max_epochs=1, default_root_dir=tmp_path, enable_checkpointing=True)
    fit.fit(module, loader())
    ckpt = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith("teacher.") for k in state["state_dict"])
    assert state["hyper_parameters"]["teacher_checkpoint"] == paths and state["hyper_parameters"]["teacher_weights"] == [3, 1]
    # fresh (random) members: each comes back from its recorded file, with the recorded weights
    restored = DistillationModule.load_from_checkpoint(ckpt, teacher=[get_model("cnn1d"), get_model("cnn1d")], student=get_model("mlp"))
    assert isinstance(restored.teacher, TeacherEnsemble) and restored.teacher.weights == {"0": 0.75, "1": 0.25}
    for name, source in (("0", a), ("1", b)):
        for key, value in source.state_dict().items():
            assert torch.equal(restored.teacher[name].state_dict()[key], value), (name, key)
    for key, value in module.student.state_dict().items():
        assert torch.equal(restored.student.state_dict()[key], value), key
    x = torch.randn(4, 40)
    assert torch.equal(restored.teacher_forward(x), module.teacher_forward(x))


def test_a_per_member_dtype_with_integer_keys_trains(tmp_path):
    """`{0: "bfloat16"}` (what a YAML list index gives) selects member "0", in load_teacher and through Speed."""
    a, b = get_model("cnn1d").eval(), get_model("cnn1d").eval()
    x = torch.randn(4, 40)
    with torch.no_grad():
        expected = 0.5 * copy.deepcopy(a).bfloat16()(x.bfloat16()).float() + 0.5 * b(x)
    ensemble = load_teacher([copy.deepcopy(a), copy.deepcopy(b)], dtype={0: "bfloat16"})
    assert ensemble.dtypes == {"0": torch.bfloat16}
    assert {p.dtype for p in ensemble["0"].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ensemble["1"].parameters()} == {torch.float32}
    assert torch.equal(ensemble(x), expected)

    module = DistillationModule([a, b], get_model("mlp"), speed=Speed(teacher_dtype={0: "bfloat16"}))
    assert {p.dtype for p in module.teacher["0"].parameters()} == {torch.bfloat16}
    assert torch.equal(module.teacher_forward(x), expected)
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    fit = trainer(max_epochs=1, default_root_dir=tmp_path)
    fit.fit(module, loader())
    assert torch.isfinite(fit.callback_metrics["train/loss_epoch"])
    assert all(torch.equal(v, before[k]) for k, v in module.teacher.state_dict().items())


def test_teacher_weights_need_several_teachers():
    with pytest.raises(ValueError, match="`teacher_weights` is for several teachers"):
        DistillationModule(get_model("cnn1d"), get_model("mlp"), teacher_weights=[1.0])


# ------------------------------------------------------------------ mixed precision
def test_methods_combined_under_bf16_mixed_give_float32_losses_close_to_fp32():
    """DKD + FitNet + a learned temperature + two teachers in one module, under CPU bf16 autocast."""
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        L.seed_everything(0)
        teachers = [get_model("cnn1d").eval(), get_model("cnn1d").eval()]
        module = DistillationModule(teachers, get_model("mlp"), soft_loss=DKDLoss(temperature=LearnableTemperature(4.0)), alpha=0.5,
                                    features={"fitnet": FeatureTerm(FitNetLoss(), "0.features.3", "hidden.1")})
        fit = trainer(precision=precision, max_steps=1, log_every_n_steps=1)
        fit.fit(module, loader(n=16, batch_size=16))
        metrics = fit.callback_metrics
        assert metrics["train/soft_loss"].dtype == torch.float32
        losses[precision] = {k: metrics[k].item() for k in ("train/soft_loss", "train/hard_loss", "train/feature_fitnet")}
    for key, value in losses["32-true"].items():
        assert losses["bf16-mixed"][key] == pytest.approx(value, rel=0.05), key  # bf16 matmuls, float32 loss math


def test_a_linear_adapter_maps_channels_last_hidden_states():
    adapter = build_adapter((4, 7, 16), (4, 7, 32), "linear")  # (B, S, D): a transformer's hidden states
    assert isinstance(adapter, nn.Linear) and adapter(torch.randn(4, 7, 16)).shape == (4, 7, 32)
    with pytest.raises(ValueError, match="maps the last dimension only"):
        build_adapter((4, 7, 16), (4, 9, 32), "linear")
    with pytest.raises(ValueError, match="Unknown adapter 'mlp'"):
        build_adapter((4, 16), (4, 32), "mlp")


def test_fitnet_with_a_linear_adapter_on_sequence_features():
    class Seq(nn.Module):  # (B, S) token ids -> hidden states (B, S, D) -> logits (B, S, V)
        def __init__(self, width):
            super().__init__()
            self.embed, self.body, self.head = nn.Embedding(11, width), nn.Linear(width, width), nn.Linear(width, 11)

        def forward(self, ids):
            return self.head(torch.relu(self.body(self.embed(ids))))

    teacher, student = Seq(32), Seq(8)
    module = DistillationModule(teacher, student, features={"fitnet": FeatureTerm(FitNetLoss(adapter="linear"), "body", "body")})
    module.example_input_array = torch.randint(0, 11, (2, 5))
    module.setup("fit")
    adapter = module.feature_distillation.adapters["fitnet_0"]
    assert isinstance(adapter, nn.Linear) and (adapter.in_features, adapter.out_features) == (8, 32)
    ids = torch.randint(0, 11, (3, 5))
    module.teacher_forward(ids), module.student_forward(ids)
    # (B, S, V) logits: the module reads (B, S, D) features as sequences, with the batch's token mask (all valid here)
    value = module.feature_distillation.losses(mask=torch.ones(3, 5, dtype=torch.bool))["fitnet"]
    expected = fitnet_loss(adapter(student.body(student.embed(ids))), teacher.body(teacher.embed(ids)))
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    module.teardown("fit")
    with pytest.raises(ValueError, match=r"Unknown adapter 'dense'. Expected one of auto, linear, conv"):
        FitNetLoss(adapter="dense")
