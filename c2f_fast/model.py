"""The Coarse-to-Fine model: encoder, global attention, attention-LSTM decoder (docs/model.md).

One switch, ``ModelConfig.fast_kernels``, picks the Triton ops of the ``kernels`` package for the
global attention, the local attention and the LSTM step; otherwise the decoder is plain PyTorch
(the reference path). Both compute the same function.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import BACKBONES, build_encoder
from .step_linear import StepLinears

VARIANTS = ("vgg", "lstm", "lstm_l", "lstm_lg")

#: Label-sequence padding value (past an image's last label).
PAD = -1

_VALUE_CHECKS = contextvars.ContextVar("c2f_value_checks", default=True)


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Turn the data-dependent input checks of the model and the loss (label indices in range,
    targets in {1, 0, -1}) on or off inside the block. Each check reads a device tensor on the host,
    a sync that stalls the GPU; the training step turns them off, since its inputs are checked once
    when the data is read. Checks are also skipped while ``torch.compile`` traces."""
    token = _VALUE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def checking_values() -> bool:
    """Whether the data-dependent input checks run here (see :func:`value_checks`)."""
    return not torch.compiler.is_compiling() and _VALUE_CHECKS.get()


#: The opt-in decoder options of ``ModelConfig`` (all off: the paper's model).
ALIGNMENT_OPTIONS = ("glimpse_head", "query_token", "attend_after_update", "scaled_prior", "glimpse_in_prediction")


@dataclass
class ModelConfig:
    """Everything that fixes the model's shape.

    variant: "vgg" (fc7 → linear), "lstm" (no attention), "lstm_l" (local attention),
        "lstm_lg" (local + global: the full model).
    backbone: one of ``encoders.BACKBONES``; "tiny" is a small CPU-friendly VGG-style network.
    steps: decoder steps T (static); forced to 1 for variant "vgg".
    hidden, embed, attn: LSTM hidden size H, label-embedding size E, attention MLP size A.
    pretrained: None (random init), "imagenet" (torchvision weights; never a silent fallback),
        a path to the backbone's state dict, or a trained model (a run folder, its
        ``.safetensors`` or ``checkpoint.pt``): that model's encoder, e.g. to train a decoder on
        a frozen encoder that an earlier run trained.
    fast_kernels: use the Triton ops for attention and the LSTM step.

    Opt-in decoder options (off: the paper's model; docs/model.md, "Aligned local attention"):
    glimpse_head: a linear layer on each step's glimpse Σ_i β_ti a_i giving class logits
        (``C2FOutput.glimpse_logits``), trained by ``optim.lambda3`` against the step's target.
    query_token: the local attention's query also sees the token fed at that step
        (W_h h_{t-1} + W_y E y_t).
    attend_after_update: Luong order: the LSTM step comes first (fed the previous context),
        β_t is computed from h_t and the prediction sees [h_t; z_t; f_fc].
    scaled_prior: Eq. 5's prior is L·α̂ instead of α̂ (a uniform global attention is prior 1).
    glimpse_in_prediction: the step's prediction adds the glimpse head's class logits,
        p_t = σ(W_p [h_t; f_fc] + b_p + W_g g_t + b_g) (needs ``glimpse_head``): a class is emitted
        more readily by the step that looked at it.
    """

    variant: str = "lstm_lg"
    backbone: str = "vgg16"
    num_classes: int = 20
    steps: int = 5
    hidden: int = 512
    embed: int = 256
    attn: int = 512
    image_size: int = 224
    pretrained: Optional[str] = None
    fast_kernels: bool = False
    glimpse_head: bool = False
    query_token: bool = False
    attend_after_update: bool = False
    scaled_prior: bool = False
    glimpse_in_prediction: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: expected one of {BACKBONES}, got {self.backbone!r}")
        for name in ("num_classes", "steps", "hidden", "embed", "attn", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.pretrained is not None and not isinstance(self.pretrained, (str, os.PathLike)):
            raise ValueError(f"pretrained: expected None, 'imagenet' or a path, got {self.pretrained!r}")
        if self.pretrained is not None:
            self.pretrained = os.fspath(self.pretrained)
        for name in ALIGNMENT_OPTIONS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected true or false, got {value!r}")
            if value and self.variant not in ("lstm_l", "lstm_lg"):
                raise ValueError(f"{name}: needs local attention (variant lstm_l or lstm_lg), got variant {self.variant!r}")
        if self.scaled_prior and self.variant != "lstm_lg":
            raise ValueError(f"scaled_prior: scales the global attention's prior, so needs variant lstm_lg, got {self.variant!r}")
        if self.glimpse_in_prediction and not self.glimpse_head:
            raise ValueError("glimpse_in_prediction: adds the glimpse head's logits to the prediction, so needs glimpse_head")
        if self.variant == "vgg":
            self.steps = 1

    def to_dict(self) -> dict:
        return asdict(self)


class C2FOutput(NamedTuple):
    """Model output. ``logits`` = max over steps of ``step_logits`` (Eq. 12 on logits)."""

    logits: torch.Tensor  # [B, C]
    step_logits: torch.Tensor  # [B, T, C]
    global_attn: Optional[torch.Tensor]  # [B, L] (alpha-hat) or None
    local_attn: Optional[torch.Tensor]  # [B, T, L] (beta) or None
    glimpse_logits: Optional[torch.Tensor] = None  # [B, T, C] with ModelConfig.glimpse_head, else None

    @property
    def scores(self) -> torch.Tensor:
        """Final prediction p-hat = max_t p_t, in (0, 1)."""
        return torch.sigmoid(self.logits)

    @property
    def step_scores(self) -> torch.Tensor:
        """Per-step predictions p_t (the matrix Q of Eq. 15), in (0, 1)."""
        return torch.sigmoid(self.step_logits)


class GlobalAttention(nn.Module):
    """Eq. 1–3: one scalar score per region, softmax over regions, attended context."""

    def __init__(self, feat_dim: int):
        super().__init__()
        self.score = nn.Linear(feat_dim, 1)

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.score(feats).squeeze(-1))

    def forward(self, feats: torch.Tensor, fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.scores(feats)
        if fast:
            import kernels

            return kernels.attention_pool(feats, e, None)
        alpha = torch.softmax(e, dim=1)
        return torch.einsum("bl,bld->bd", alpha, feats), alpha


class LocalAttention(nn.Module):
    """Eq. 4–5: additive (Bahdanau) attention guided by the global weights.

    s_ti = v · tanh(W_a a_i + W_h h_{t-1} + b); beta_t = softmax_i(s_t);
    z_t = sum_i beta_ti · prior_i · a_i, where prior is alpha-hat (or 1 without global attention).
    """

    def __init__(self, feat_dim: int, hidden: int, attn: int):
        super().__init__()
        self.feat_proj = nn.Linear(feat_dim, attn)  # W_a and b: applied once per image
        self.query_proj = nn.Linear(hidden, attn, bias=False)  # W_h
        self.v = nn.Parameter(torch.empty(attn).uniform_(-attn**-0.5, attn**-0.5))

    def forward(
        self,
        feats: torch.Tensor,
        feats_proj: torch.Tensor,
        h: torch.Tensor,
        prior: Optional[torch.Tensor],
        fast: bool,
        query_extra: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.query_proj(h)
        if query_extra is not None:  # ModelConfig.query_token: W_y E y_t joins W_h h
            q = q + query_extra
        if fast:
            import kernels

            return kernels.additive_attention(feats, feats_proj, q, self.v, prior)
        beta = torch.softmax(self.scores(feats_proj + q.unsqueeze(1)), dim=1)
        w = beta if prior is None else beta * prior
        return torch.einsum("bl,bld->bd", w, feats), beta

    def scores(self, u: torch.Tensor) -> torch.Tensor:
        """s_ti = v · tanh(u_ti) for u = W_a a_i + W_h h_{t-1} + b [B, L, A] (reference path)."""
        return torch.tanh(u) @ self.v


class C2FNet(nn.Module):
    """The Coarse-to-Fine network (and the ablation variants of Tables I–II)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.fast_kernels:  # where the Triton ops cannot run they take their references: say so, once
            import kernels

            kernels.warn_if_unavailable("ModelConfig(fast_kernels=True)")
        self.encoder = build_encoder(cfg.backbone, cfg.pretrained)
        D, Fdim = self.encoder.feat_dim, self.encoder.fc_dim
        C, H = cfg.num_classes, cfg.hidden
        self.feat_dim, self.fc_dim = D, Fdim
        if cfg.variant == "vgg":
            self.classifier = nn.Linear(Fdim, C)
            return
        # label tokens: classes 0..C-1, then START and PAD
        self.start_token, self.pad_token = C, C + 1
        self.embedding = nn.Embedding(C + 2, cfg.embed)
        self.lstm = nn.LSTMCell(cfg.embed + D, H)
        # p_t = sigmoid(W_p [h_t; f_fc] + b_p); attend_after_update: [h_t; z_t; f_fc]
        self.predict = nn.Linear(H + (D if cfg.attend_after_update else 0) + Fdim, C)
        if cfg.variant in ("lstm_l", "lstm_lg"):
            self.local_attn = LocalAttention(D, H, cfg.attn)
        if cfg.query_token:
            self.token_query = nn.Linear(cfg.embed, cfg.attn, bias=False)  # W_y: fed token into the query
        if cfg.glimpse_head:
            self.glimpse_classify = nn.Linear(D, C)  # class logits of the glimpse Σ_i β_ti a_i
        if cfg.variant == "lstm_lg":
            self.global_attn = GlobalAttention(D)
            self.init_c = nn.Linear(D, H)  # I_c
            self.init_h = nn.Linear(D, H)  # I_h

    # ---------------------------------------------------------------- checks
    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a float tensor [B, 3, H, W], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images: expected a floating-point tensor, got {images.dtype}")

    def _check_label_seq(self, label_seq: torch.Tensor, batch: int) -> None:
        T, C = self.cfg.steps, self.cfg.num_classes
        if label_seq.dim() != 2 or label_seq.shape[0] != batch or label_seq.shape[1] < T:
            raise ValueError(
                f"label_seq: expected class indices [B={batch}, T>={T}] (PAD={PAD}), got {tuple(label_seq.shape)}"
            )
        if label_seq.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"label_seq: expected an integer tensor, got {label_seq.dtype}")
        if checking_values():  # a data-dependent check (a host sync): see value_checks()
            lo, hi = int(label_seq.min()), int(label_seq.max())
            if lo < PAD or hi >= C:
                raise ValueError(
                    f"label_seq: class indices must lie in [0, num_classes={C}) or be PAD={PAD}; found {lo}..{hi}"
                )

    # ---------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor, label_seq: Optional[torch.Tensor] = None) -> C2FOutput:
        """Teacher forcing when ``label_seq`` ([B, T] class indices, PAD = -1) is given; greedy
        decoding when it is None (each step feeds the best class not yet emitted while its
        probability is >= 0.5, then PAD). In both, a class already fed to the decoder scores -inf
        at later steps (the no-copy rule, docs/model.md "Decoder")."""
        self._check_images(images)
        feats, f_fc = self.encoder(images)
        return self.decode(feats, f_fc, label_seq)

    def decode(
        self, feats: torch.Tensor, f_fc: torch.Tensor, label_seq: Optional[torch.Tensor] = None
    ) -> C2FOutput:
        """The decoder alone, on encoder outputs ``feats`` [B, L, D] and ``f_fc`` [B, F]."""
        cfg = self.cfg
        B, L, D = feats.shape
        if cfg.variant == "vgg":
            logits = self.classifier(f_fc)
            return C2FOutput(logits, logits.unsqueeze(1), None, None)
        if label_seq is not None:
            self._check_label_seq(label_seq, B)
        fast = cfg.fast_kernels
        T, H = cfg.steps, cfg.hidden

        alpha = None
        if cfg.variant == "lstm_lg":
            z_hat, alpha = self.global_attn(feats, fast)
            h, c = self.init_h(z_hat / L), self.init_c(z_hat / L)  # Eq. 3, /L as in the paper
        else:
            h = feats.new_zeros(B, H)
            c = feats.new_zeros(B, H)
        local = cfg.variant in ("lstm_l", "lstm_lg")
        feats_proj = self.local_attn.feat_proj(feats) if local else None
        mean_feats = None if local else feats.mean(dim=1)

        prior = alpha * L if (alpha is not None and cfg.scaled_prior) else alpha
        after = cfg.attend_after_update
        z = feats.new_zeros(B, D) if after else None  # the context fed to the first LSTM step
        token = torch.full((B,), self.start_token, dtype=torch.long, device=feats.device)
        # fed[b, k]: token k has been fed to image b's decoder (classes 0..C-1, then START, PAD)
        fed = torch.zeros(B, cfg.num_classes + 2, dtype=torch.bool, device=feats.device)
        fed[:, self.start_token] = True
        stopped = torch.zeros(B, dtype=torch.bool, device=feats.device)
        step_logits, betas, glimpse_logits = [], [], []
        steps = None if fast else StepLinears()
        for t in range(T):
            emb = self.embedding(token)
            query_extra = self.token_query(emb) if cfg.query_token else None
            if after:  # Luong order: update with the previous context, then attend from h_t
                h, c = self._lstm_step(torch.cat([emb, z], dim=1), h, c, fast, steps)
                z, beta = self.local_attn(feats, feats_proj, h, prior, fast, query_extra)
                betas.append(beta)
                logit = self.predict(torch.cat([h, z, f_fc], dim=1))
            else:
                if local:
                    z, beta = self.local_attn(feats, feats_proj, h, prior, fast, query_extra)
                    betas.append(beta)
                else:
                    z = mean_feats
                h, c = self._lstm_step(torch.cat([emb, z], dim=1), h, c, fast, steps)
                logit = self.predict(torch.cat([h, f_fc], dim=1))
            if cfg.glimpse_head:  # the glimpse without the prior: where the step looked, unscaled
                glimpse = torch.einsum("bl,bld->bd", beta, feats)
                glimpse_logits.append(self.glimpse_classify(glimpse))
                if cfg.glimpse_in_prediction:
                    logit = logit + glimpse_logits[-1]
            # No copying (docs/model.md, "Decoder"): a class already fed to the decoder scores
            # -inf at this step and every later one. Step 0 (fed START) is never masked.
            if t > 0:
                logit = logit.masked_fill(fed[:, : cfg.num_classes], float("-inf"))
            step_logits.append(logit)
            if t + 1 < T:
                if label_seq is not None:  # teacher forcing: the t-th label, PAD past the last
                    prev = label_seq[:, t].long()
                    token = torch.where(prev < 0, torch.full_like(prev, self.pad_token), prev)
                else:  # greedy: the best class not yet emitted while p >= 0.5, then PAD for good
                    best, choice = logit.detach().max(dim=1)
                    stopped = stopped | ~(best >= 0)  # logit >= 0 <=> p >= 0.5; -inf or NaN stops
                    token = torch.where(stopped, torch.full_like(choice, self.pad_token), choice)
                index = token.unsqueeze(1)
                fed = fed.scatter(1, index, torch.ones_like(index, dtype=torch.bool))
        step_logits_t = torch.stack(step_logits, dim=1)
        return C2FOutput(
            logits=step_logits_t.amax(dim=1),
            step_logits=step_logits_t,
            global_attn=alpha,
            local_attn=torch.stack(betas, dim=1) if local else None,
            glimpse_logits=torch.stack(glimpse_logits, dim=1) if cfg.glimpse_head else None,
        )

    def _lstm_step(self, x, h, c, fast: bool, steps: Optional[StepLinears] = None):
        if fast:
            import kernels

            gates_x = F.linear(x, self.lstm.weight_ih, self.lstm.bias_ih)
            return kernels.lstm_cell(gates_x, h, c, self.lstm.weight_hh, self.lstm.bias_hh)
        lstm = self.lstm
        if steps is None or not steps.defers(lstm.weight_ih):
            return lstm(x, (h, c))
        # nn.LSTMCell's function (gate order i, f, g, o), its two products through ``steps`` so that
        # their weight gradients are one product over all steps (c2f_fast/step_linear.py)
        gates = steps.linear(x, lstm.weight_ih, lstm.bias_ih) + steps.linear(h, lstm.weight_hh, lstm.bias_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def greedy_emissions(step_logits: torch.Tensor) -> torch.Tensor:
    """The class each step emits in greedy decoding, from its (masked) step logits [B, T, C].

    Step t emits the best class of its logits while that class's probability is >= 0.5 (classes
    emitted earlier are already -inf there); from the first step below 0.5 on, nothing (PAD = -1).
    Returns a LongTensor [B, T]. The last step's emission is never fed back, but it counts as a
    prediction of that step (e.g. for the pointing game).
    """
    best, choice = step_logits.max(dim=2)
    stopped = torch.cumsum((~(best >= 0)).to(torch.int32), dim=1) > 0  # cumsum: exportable to ONNX
    return torch.where(stopped, torch.full_like(choice, PAD), choice)


__all__ = ["ALIGNMENT_OPTIONS", "C2FNet", "C2FOutput", "ModelConfig", "PAD", "VARIANTS", "greedy_emissions"]
