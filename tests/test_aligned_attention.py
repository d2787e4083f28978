"""The opt-in decoder options for aligned local attention (docs/model.md, "Aligned local
attention"): each option's forward and backward on the fast path (Triton ops) against the
reference path, the two loss terms on hand-built cases, and their config checks."""

import math

import pytest
import torch

from c2f_fast.config import ConfigError, load_config
from c2f_fast.labels import class_frequency_order, label_sequences
from c2f_fast.losses import c2f_loss, coverage_penalty, glimpse_loss
from c2f_fast.model import ALIGNMENT_OPTIONS, C2FNet, C2FOutput, ModelConfig, PAD
from conftest import DEVICE, SMALL_MODEL
from test_model_fast import kernels_only, twin_models  # noqa: F401  (a fixture)

#: Each option alone, the measured best pair, and all four together.
SETTINGS = [
    {"glimpse_head": True},
    {"query_token": True},
    {"attend_after_update": True},
    {"scaled_prior": True},
    {"glimpse_head": True, "query_token": True},
    {"glimpse_head": True, "query_token": True, "glimpse_in_prediction": True},
    {name: True for name in ALIGNMENT_OPTIONS},
]


def _decoder_grads(model, feats, f_fc, seq, targets):
    feats = feats.clone().requires_grad_(True)
    f_fc = f_fc.clone().requires_grad_(True)
    out = model.decode(feats, f_fc, seq)
    lambda3 = 1.0 if out.glimpse_logits is not None else 0.0
    loss, parts = c2f_loss(out, targets, seq, lambda3=lambda3, lambda4=0.5)
    assert ("glimpse" in parts) == (lambda3 > 0) and "coverage" in parts
    extra = (out.local_attn * torch.linspace(0, 1, out.local_attn.shape[-1], device=feats.device)).sum()
    (loss + extra).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, feats.grad, f_fc.grad, grads


@pytest.mark.parametrize("options", SETTINGS, ids=lambda o: "+".join(sorted(o)))
@pytest.mark.parametrize("variant,L", [("lstm_lg", 49), ("lstm_lg", 197), ("lstm_l", 61)])
def test_option_fast_matches_reference(options, variant, L, kernels_only):
    if options.get("scaled_prior") and variant != "lstm_lg":
        pytest.skip("scaled_prior needs the global attention")
    ref, fast = twin_models(variant, **options)
    B = 3
    feats = torch.rand(B, L, ref.feat_dim, device=DEVICE)
    f_fc = torch.randn(B, ref.fc_dim, device=DEVICE)
    targets = torch.tensor([[1, 0, 1, 0, -1], [0, 1, 0, 0, 1], [1, 1, 1, 0, 0]], device=DEVICE)
    seq = label_sequences(targets, class_frequency_order(targets), 3)
    o_ref, gf_ref, gfc_ref, g_ref = _decoder_grads(ref, feats, f_fc, seq, targets)
    o_fast, gf_fast, gfc_fast, g_fast = _decoder_grads(fast, feats, f_fc, seq, targets)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_fast.step_logits, o_ref.step_logits, **tol)
    torch.testing.assert_close(o_fast.local_attn, o_ref.local_attn, **tol)
    assert (o_ref.glimpse_logits is None) == (not options.get("glimpse_head"))
    if o_ref.glimpse_logits is not None:
        assert o_ref.glimpse_logits.shape == (B, ref.cfg.steps, ref.cfg.num_classes)
        torch.testing.assert_close(o_fast.glimpse_logits, o_ref.glimpse_logits, **tol)
    torch.testing.assert_close(gf_fast, gf_ref, **tol)
    torch.testing.assert_close(gfc_fast, gfc_ref, **tol)
    assert g_fast.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], **tol, msg=lambda m: f"{name}: {m}")
    # every new parameter is trained
    for name in ("token_query.weight", "glimpse_classify.weight"):
        if hasattr(ref, name.split(".")[0]):
            assert name in g_ref and bool(g_ref[name].abs().sum() > 0), name


@pytest.mark.parametrize("options", SETTINGS, ids=lambda o: "+".join(sorted(o)))
def test_option_greedy_fast_matches_reference(options, kernels_only):
    ref, fast = twin_models("lstm_lg", **options)
    feats = torch.rand(2, 49, ref.feat_dim, device=DEVICE)
    f_fc = torch.randn(2, ref.fc_dim, device=DEVICE)
    with torch.no_grad():
        o_ref, o_fast = ref.decode(feats, f_fc), fast.decode(feats, f_fc)
    torch.testing.assert_close(o_fast.step_logits, o_ref.step_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_fast.local_attn, o_ref.local_attn, rtol=1e-5, atol=1e-5)


def test_query_token_moves_the_attention_of_later_steps():
    """query_token with W_y = 0 is the paper's attention exactly (same shared weights); a nonzero
    W_y moves it."""
    torch.manual_seed(0)
    base = C2FNet(ModelConfig(variant="lstm_lg", **SMALL_MODEL))
    model = C2FNet(ModelConfig(variant="lstm_lg", **SMALL_MODEL, query_token=True))
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["token_query.weight"] and not unexpected
    feats = torch.rand(2, 49, base.feat_dim)
    f_fc = torch.randn(2, base.fc_dim)
    seq = torch.tensor([[1, 2, PAD], [0, PAD, PAD]])
    with torch.no_grad():
        model.token_query.weight.zero_()
        torch.testing.assert_close(model.decode(feats, f_fc, seq).local_attn, base.decode(feats, f_fc, seq).local_attn)
        torch.nn.init.normal_(model.token_query.weight)
        moved = model.decode(feats, f_fc, seq).local_attn
        assert not torch.allclose(moved, base.decode(feats, f_fc, seq).local_attn)


def test_scaled_prior_is_cells_times_alpha():
    """scaled_prior: the context is Σ β·(L·α̂)·a, i.e. L times Eq. 5's at step 0 (same β_0)."""
    torch.manual_seed(0)
    model = C2FNet(ModelConfig(variant="lstm_lg", **SMALL_MODEL))
    feats = torch.rand(2, 49, model.feat_dim)
    with torch.no_grad():
        z_hat, alpha = model.global_attn(feats, False)
        h = model.init_h(z_hat / 49)
        proj = model.local_attn.feat_proj(feats)
        z, beta = model.local_attn(feats, proj, h, alpha, False)
        z_scaled, beta_scaled = model.local_attn(feats, proj, h, alpha * 49, False)
    torch.testing.assert_close(beta_scaled, beta)
    torch.testing.assert_close(z_scaled, 49 * z)


# ----------------------------------------------------------------------------------------------
# the loss terms, by hand
# ----------------------------------------------------------------------------------------------


def test_glimpse_loss_hand_built():
    # two images, T = 3, C = 2. Image 0 targets [1, 0, PAD]; image 1 targets [0, PAD, PAD].
    logits = torch.tensor([
        [[0.0, 2.0], [1.0, 1.0], [5.0, -5.0]],   # step 2 is PAD: ignored
        [[3.0, 0.0], [9.0, 9.0], [0.0, 0.0]],
    ])
    seq = torch.tensor([[1, 0, PAD], [0, PAD, PAD]])
    ce = [
        -math.log(math.exp(2) / (1 + math.exp(2))),  # image 0, step 0, target 1
        math.log(2.0),  # image 0, step 1, equal logits
        -math.log(math.exp(3) / (math.exp(3) + 1)),  # image 1, step 0, target 0
    ]
    expected = sum(ce) / 3
    assert glimpse_loss(logits, seq).item() == pytest.approx(expected, rel=1e-6)
    assert glimpse_loss(logits, torch.full((2, 3), PAD)).item() == 0.0  # no target: 0, not NaN


def test_glimpse_loss_enters_c2f_loss_with_its_weight():
    step_logits = torch.tensor([[[2.0, -2.0], [-1.0, 1.0]]])
    glimpse = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    out = C2FOutput(step_logits.amax(1), step_logits, None, None, glimpse)
    targets = torch.tensor([[1, 1]])
    seq = torch.tensor([[0, 1]])
    base, parts0 = c2f_loss(out, targets, seq)
    with_g, parts = c2f_loss(out, targets, seq, lambda3=0.5)
    g = math.log(1 + math.e)  # each step's target has logit 0 against 1
    assert parts["glimpse"].item() == pytest.approx(g, rel=1e-6)
    assert (with_g - base).item() == pytest.approx(0.5 * g, rel=1e-6)
    assert "glimpse" not in parts0
    with pytest.raises(ValueError, match="glimpse_head"):
        c2f_loss(out._replace(glimpse_logits=None), targets, seq, lambda3=1.0)
    with pytest.raises(ValueError, match="label_seq"):
        c2f_loss(out, targets, None, lambda3=1.0)


def test_coverage_penalty_hand_built():
    # L = 3, T = 2. Image 0: both steps on cell 0 → Σ_t = (2, 0, 0): (2-1)² = 1.
    # Image 1: (0.5, 0.5, 0) and (0, 0.2, 0.8) → Σ_t = (0.5, 0.7, 0.8): nothing above 1 → 0.
    # Image 2: (0.9, 0.1, 0) twice → (1.8, 0.2, 0): 0.8² = 0.64.
    attn = torch.tensor([
        [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
        [[0.5, 0.5, 0.0], [0.0, 0.2, 0.8]],
        [[0.9, 0.1, 0.0], [0.9, 0.1, 0.0]],
    ])
    torch.testing.assert_close(coverage_penalty(attn), torch.tensor([1.0, 0.0, 0.64]))
    z = torch.zeros(3, 2)
    out = C2FOutput(z, z[:, None], None, attn)
    targets = torch.tensor([[1, 0], [0, 1], [1, 1]])
    base, _ = c2f_loss(out, targets, lambda1=0, lambda2=0)
    loss, parts = c2f_loss(out, targets, lambda1=0, lambda2=0, lambda4=2.0)
    assert parts["coverage"].item() == pytest.approx(1.64 / 3, rel=1e-6)
    assert (loss - base).item() == pytest.approx(2.0 * 1.64 / 3, rel=1e-6)
    with pytest.raises(ValueError, match="local attention"):
        c2f_loss(out._replace(local_attn=None), targets, lambda4=1.0)


# ----------------------------------------------------------------------------------------------
# config checks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALIGNMENT_OPTIONS)
def test_options_need_local_attention(name):
    with pytest.raises(ValueError, match=name):
        ModelConfig(variant="lstm", **{name: True})


def test_glimpse_in_prediction_adds_the_glimpse_logits_and_needs_the_head():
    """p_t's logits with the option are those of the same weights without it plus the glimpse
    head's logits (teacher forcing: the same tokens; classes masked by the no-copy rule stay -inf)."""
    torch.manual_seed(0)
    cfg = dict(variant="lstm_lg", backbone="tiny", num_classes=5, steps=3, hidden=16, embed=8, attn=12,
               glimpse_head=True, query_token=True)
    model = C2FNet(ModelConfig(**cfg, glimpse_in_prediction=True))
    feats, f_fc = torch.rand(2, 49, model.feat_dim), torch.randn(2, model.fc_dim)
    seq = torch.tensor([[1, 3, PAD], [0, PAD, PAD]])
    with torch.no_grad():
        joined = model.decode(feats, f_fc, seq)
        model.cfg.glimpse_in_prediction = False
        plain = model.decode(feats, f_fc, seq)
    torch.testing.assert_close(joined.glimpse_logits, plain.glimpse_logits)
    masked = torch.isinf(plain.step_logits)
    assert masked.any() and torch.equal(torch.isinf(joined.step_logits), masked)
    torch.testing.assert_close(joined.step_logits[~masked], (plain.step_logits + plain.glimpse_logits)[~masked])
    with pytest.raises(ValueError, match="glimpse_in_prediction.*glimpse_head"):
        ModelConfig(variant="lstm_lg", glimpse_in_prediction=True)


def test_scaled_prior_needs_global_attention():
    with pytest.raises(ValueError, match="scaled_prior"):
        ModelConfig(variant="lstm_l", scaled_prior=True)


def test_config_cross_checks():
    with pytest.raises(ConfigError, match="optim.lambda3.*model.glimpse_head"):
        load_config(None, ["optim.lambda3=1"])
    with pytest.raises(ConfigError, match="optim.lambda4.*local attention"):
        load_config(None, ["model.variant=lstm", "optim.lambda4=1"])
    with pytest.raises(ConfigError, match="model.query_token"):
        load_config(None, ["model.query_token=yes please"])
    cfg = load_config(None, ["model.glimpse_head=true", "model.query_token=true", "optim.lambda3=1"])
    assert cfg.model.glimpse_head and cfg.model.query_token and cfg.optim.lambda3 == 1.0
    default = load_config(None)
    assert not any(getattr(default.model, n) for n in ALIGNMENT_OPTIONS)
    assert default.optim.lambda3 == 0 and default.optim.lambda4 == 0
