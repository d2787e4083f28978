"""The reference model: shapes of every variant, gradients, decoding paths, input checks."""

import math

import pytest
import torch

from c2f_fast.encoders import build_encoder, feature_map_size
from c2f_fast.labels import class_frequency_order, label_sequences
from c2f_fast.losses import c2f_loss
from c2f_fast.model import PAD, VARIANTS, C2FNet, C2FOutput, ModelConfig

SMALL = dict(backbone="tiny", num_classes=6, steps=3, hidden=20, embed=8, attn=12, image_size=48)


def small_model(variant, **kw):
    return C2FNet(ModelConfig(variant=variant, **{**SMALL, **kw}))


TARGETS = torch.tensor([[1, 0, -1, 1, 0, 1], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]])


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes(variant):
    model = small_model(variant)
    images = torch.randn(3, 3, 48, 48)
    seq = label_sequences(TARGETS, class_frequency_order(TARGETS), 3)
    out = model(images, seq)
    assert isinstance(out, C2FOutput)
    T = 1 if variant == "vgg" else 3
    L = feature_map_size("tiny", 48) ** 2
    assert out.logits.shape == (3, 6)
    assert out.step_logits.shape == (3, T, 6)
    torch.testing.assert_close(out.logits, out.step_logits.amax(dim=1))
    torch.testing.assert_close(out.scores, torch.sigmoid(out.logits))
    torch.testing.assert_close(out.step_scores, torch.sigmoid(out.step_logits))
    if variant == "lstm_lg":
        assert out.global_attn.shape == (3, L)
        torch.testing.assert_close(out.global_attn.sum(1), torch.ones(3))
    else:
        assert out.global_attn is None
    if variant in ("lstm_l", "lstm_lg"):
        assert out.local_attn.shape == (3, T, L)
        torch.testing.assert_close(out.local_attn.sum(-1), torch.ones(3, T))
    else:
        assert out.local_attn is None


def test_output_is_a_namedtuple_constructible_by_keyword():
    z = torch.zeros(2, 4)
    out = C2FOutput(logits=z, step_logits=z[:, None], global_attn=None, local_attn=None)
    assert out._fields == ("logits", "step_logits", "global_attn", "local_attn", "glimpse_logits")
    assert out.glimpse_logits is None  # only with ModelConfig.glimpse_head


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_gradient(variant):
    model = small_model(variant)
    seq = label_sequences(TARGETS, class_frequency_order(TARGETS), 3)
    out = model(torch.randn(3, 3, 48, 48), seq)
    loss, _ = c2f_loss(out, TARGETS, seq)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("variant", ["lstm", "lstm_l", "lstm_lg"])
def test_teacher_forcing_and_greedy_decoding(variant):
    model = small_model(variant).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        greedy = model(images)
        # Feeding the greedy choices back as the teacher sequence reproduces greedy decoding:
        # the best class not yet emitted while p >= 0.5, PAD from the first step below it on.
        chosen = []
        stopped = torch.zeros(2, dtype=torch.bool)
        for t in range(3):
            best, step = greedy.step_logits[:, t].max(1)  # emitted classes are already -inf
            stopped |= best < 0
            chosen.append(torch.where(stopped, torch.full_like(step, PAD), step))
        forced = model(images, torch.stack(chosen, 1))
        torch.testing.assert_close(forced.step_logits, greedy.step_logits)
        # A different teacher sequence changes the later steps but never the first.
        other = model(images, torch.full((2, 3), PAD))
        torch.testing.assert_close(other.step_logits[:, 0], greedy.step_logits[:, 0])
        assert not torch.allclose(other.step_logits[:, 1:], greedy.step_logits[:, 1:])


def test_greedy_with_more_steps_than_classes():
    model = small_model("lstm_l", num_classes=2, steps=4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 48))
    assert out.step_logits.shape == (1, 4, 2)


def test_global_attention_initialises_the_lstm():
    """Variant lstm_lg starts from I_h(z/L), I_c(z/L); the others from zeros (docs/model.md, "Global attention", Eq. 3)."""
    model = small_model("lstm_lg").eval()
    feats = torch.randn(2, 9, model.feat_dim)
    f_fc = torch.randn(2, model.fc_dim)
    with torch.no_grad():
        base = model.decode(feats, f_fc)
        model.init_h.bias.add_(1.0)
        moved = model.decode(feats, f_fc)
    assert not torch.allclose(base.step_logits[:, 0], moved.step_logits[:, 0])


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(3, 48, 48), "images"),
        (torch.randn(1, 1, 48, 48), "images"),
        (torch.randn(1, 4, 48, 48), "images"),
        (torch.zeros(1, 3, 48, 48, dtype=torch.uint8), "images"),
    ],
)
def test_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        small_model("lstm_lg")(bad)


def test_bad_label_seq():
    model = small_model("lstm_lg")
    images = torch.randn(2, 3, 48, 48)
    with pytest.raises(ValueError, match="label_seq"):
        model(images, torch.zeros(2, 2, dtype=torch.long))  # shorter than T
    with pytest.raises(ValueError, match="label_seq"):
        model(images, torch.full((2, 3), 6))  # class 6 with num_classes 6
    with pytest.raises(ValueError, match="label_seq"):
        model(images, torch.full((2, 3), -2))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps=0), "steps"),
        (dict(num_classes=0), "num_classes"),
        (dict(variant="transformer"), "variant"),
        (dict(backbone="vit"), "backbone"),
        (dict(hidden=-1), "hidden"),
        (dict(steps=2.5), "steps"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**SMALL, **kw})


def test_vgg_variant_has_one_step():
    assert ModelConfig(variant="vgg", steps=5).steps == 1


def test_vgg16_encoder_shapes():
    """conv5_3 at 224 px is 14x14x512 (L = 196) and fc7 is 4096-d (docs/model.md, "Encoder")."""
    enc = build_encoder("vgg16").eval()
    with torch.no_grad():
        a, f_fc = enc(torch.randn(1, 3, 224, 224))
    assert a.shape == (1, 196, 512) and f_fc.shape == (1, 4096)
    assert feature_map_size("vgg16", 448) ** 2 == 784
    assert (a >= 0).all()  # after conv5_3's ReLU


def test_resnet_feature_map_size_matches_the_network():
    enc = build_encoder("resnet50").eval()
    with torch.no_grad():
        a, f = enc(torch.randn(1, 3, 100, 100))
    assert a.shape[1] == feature_map_size("resnet50", 100) ** 2
    assert a.shape[2] == f.shape[1] == 2048


def test_imagenet_weights_unavailable_says_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError) as err:
        build_encoder("vgg16", "imagenet")
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg


def test_pretrained_path_loads_a_state_dict(tmp_path):
    enc = build_encoder("tiny")
    path = tmp_path / "tiny.pt"
    torch.save(enc.state_dict(), path)
    loaded = build_encoder("tiny", path)
    for (k, v), (k2, v2) in zip(enc.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(FileNotFoundError, match="pretrained"):
        build_encoder("tiny", tmp_path / "missing.pt")
    torch.save({"not": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not fit"):
        build_encoder("tiny", tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="ImageNet"):
        build_encoder("tiny", "imagenet")


def test_attention_uses_the_global_prior():
    """z_t = sum_i beta_ti * alpha_i * a_i (docs/model.md, "Local attention"): recompute it by hand."""
    model = small_model("lstm_lg").eval()
    feats = torch.randn(2, 9, model.feat_dim)
    f_fc = torch.randn(2, model.fc_dim)
    with torch.no_grad():
        out = model.decode(feats, f_fc)
        alpha = torch.softmax(torch.tanh(model.global_attn.score(feats).squeeze(-1)), 1)
        torch.testing.assert_close(out.global_attn, alpha)
        z_hat = (alpha.unsqueeze(-1) * feats).sum(1)
        h0 = model.init_h(z_hat / 9)
        la = model.local_attn
        s = torch.tanh(la.feat_proj(feats) + la.query_proj(h0).unsqueeze(1)) @ la.v
        beta0 = torch.softmax(s, 1)
        torch.testing.assert_close(out.local_attn[:, 0], beta0)
        assert math.isclose(float(out.local_attn[0, 0].sum()), 1.0, rel_tol=1e-5)
