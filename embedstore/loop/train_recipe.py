"""Two recipes around the fine-tuning loop: LP-FT's linear probe before it, WiSE-FT's weight interpolation
after it.

LP-FT (Kumar et al., ICLR 2022): train only the classifier on the frozen features first, so fine-tuning
starts from a fitted head and distorts the pretrained features less.
WiSE-FT (Wortsman et al., CVPR 2022): the kept weights are pretrained + alpha * (fine-tuned - pretrained)
(the temporary classifier likewise, from its centroid start); alpha is given, or chosen on the selection
fold from WISE_GRID by its loss.
"""

from __future__ import annotations

import torch

WISE_GRID = (0.25, 0.5, 0.75, 1.0)


def probe(st, epochs: int) -> list[float]:
    """LP: `epochs` passes training only the cosine classifier on frozen features; returns the mean losses."""
    if epochs <= 0:
        return []
    opt = torch.optim.AdamW(st.tr.head.parameters(), lr=st.cfg.head_lr, weight_decay=0.0)
    losses = []
    for epoch in range(1, epochs + 1):
        total, count = 0.0, 0
        for x, y in st.batches.train(epoch):
            y = y.to(st.dev.device)
            with torch.no_grad():
                f = st.dev.forward(st.batches.fwd, x)
            loss = st.optim.ce(st.tr.head(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(y), count + len(y)
        losses.append(round(total / count, 4))
    return losses


def _base_values(st) -> list[torch.Tensor]:
    """What alpha = 0 means for each trainable tensor: the pretrained weight (L2-SP anchors); for LoRA the
    adapters' zero update (B = 0; A stays as trained, so the update scales by alpha)."""
    out = []
    for n, v in zip(st.tr.trainable_names, st.best_weights):
        if "lora_B" in n:
            out.append(torch.zeros_like(v))
        elif "lora_A" in n:
            out.append(v)
        else:
            out.append(st.tr.anchors[n])
    return out


@torch.no_grad()
def set_alpha(st, alpha: float) -> None:
    """Load the best epoch's weights interpolated toward the pretrained ones (and the classifier toward its start)."""
    for p, base, v in zip(st.tr.trainable, _base_values(st), st.best_weights):
        p.copy_(base + alpha * (v - base))
    st.tr.head.weight.copy_(st.head_init + alpha * (st.best_head - st.head_init))


def choose_alpha(st, held_out) -> tuple[float, dict]:
    """WiSE alpha: the configured one, or (None) the WISE_GRID value with the lowest selection-fold loss;
    leaves the chosen weights loaded. Returns (alpha, {alpha: selection loss})."""
    alpha = st.cfg.wise_alpha if st.best_epoch > 0 else 1.0  # best epoch 0: the pretrained weights as they are
    losses: dict = {}
    if alpha is None:
        if not st.batches_have_hold:
            alpha = 1.0  # nothing to choose on
        else:
            for a in WISE_GRID:
                set_alpha(st, a)
                losses[a] = round(held_out(st)[0], 4)
            alpha = min(losses, key=losses.get)
    set_alpha(st, float(alpha))
    return float(alpha), losses


def snapshot(st) -> None:
    """Remember the current trainable weights and classifier as the best so far."""
    st.best_weights = [p.detach().clone() for p in st.tr.trainable]
    st.best_head = st.tr.head.weight.detach().clone()

