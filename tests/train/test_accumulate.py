"""Gradient accumulation normalised by the tokens of the whole window equals one big batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.data import english_corpus
from kiln.train import Checkpointer, NonFiniteLoss, TrainSettings, accumulate_gradients, train
from kiln.train.accumulate import Batch, backward_batch, count_tokens

VOCAB, CLASSES, MAX_LEN = 211, 5, 96


class TokenTagger(nn.Module):
    """Per-token classifier with a little context (a conv over the sequence), so padding must be masked."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16, padding_idx=0)
        self.mix = nn.Conv1d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (B, T, 16)
        h = torch.relu(self.mix(h.transpose(1, 2))).transpose(1, 2)  # (B, T, 16)
        return self.head(h)  # (B, T, C)


def encode(texts: list[str]) -> Batch:
    """Words hashed into a small vocabulary, right-padded; labels are a function of the word."""
    rows = [[1 + sum(map(ord, w)) % (VOCAB - 1) for w in t.split()[:MAX_LEN]] for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"ids": ids, "attention_mask": mask, "y": ids % CLASSES}


def token_loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(batch["ids"])
    per_token = F.cross_entropy(logits.reshape(-1, CLASSES), batch["y"].reshape(-1), reduction="none")
    return (per_token * batch["attention_mask"].reshape(-1)).sum()


def grads(model: nn.Module) -> list[torch.Tensor]:
    out = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


@pytest.fixture
def texts() -> list[str]:
    """12 real paragraphs of very different lengths (sorted, so the micro-batches' token counts differ a lot)."""
    return sorted(english_corpus(12, offset=40), key=len)


def test_k_micro_batches_equal_one_big_batch_on_variable_length_text(texts: list[str]) -> None:
    torch.manual_seed(0)
    model = TokenTagger()
    micro = [encode(texts[:6]), encode(texts[6:10]), encode(texts[10:])]
    assert len({count_tokens(b) for b in micro}) == 3  # really variable: 3 different token counts

    window = accumulate_gradients(model, micro, token_loss_sum, count=count_tokens)
    accumulated = grads(model)

    big = encode(texts)
    big_loss = token_loss_sum(model, big) / count_tokens(big)
    big_loss.backward()
    reference = grads(model)

    assert window.count == count_tokens(big)
    assert window.loss == pytest.approx(float(big_loss.detach()), rel=1e-5)
    for a, b in zip(accumulated, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_averaging_micro_batch_means_would_not_match(texts: list[str]) -> None:
    """The naive `mean per micro-batch / k` is measurably different, so the test above can fail."""
    torch.manual_seed(0)
    model = TokenTagger()
    micro = [encode(texts[:6]), encode(texts[6:10]), encode(texts[10:])]
    for batch in micro:
        (token_loss_sum(model, batch) / count_tokens(batch) / len(micro)).backward()
    naive = grads(model)
    accumulate_gradients(model, micro, token_loss_sum, count=count_tokens)
    correct = grads(model)
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(naive, correct, strict=True))


def test_a_nan_loss_stops_before_backward() -> None:
    model = nn.Linear(2, 1)
    bad: Batch = {"x": torch.tensor([[float("nan"), 1.0]]), "y": torch.zeros(1)}
    good: Batch = {"x": torch.ones(1, 2), "y": torch.zeros(1)}

    def loss_sum(m: nn.Module, b: Batch) -> torch.Tensor:
        return ((m(b["x"]).reshape(-1) - b["y"]) ** 2).sum()

    with pytest.raises(NonFiniteLoss, match="the loss is nan on micro-batch 1"):
        accumulate_gradients(model, [good, bad], loss_sum)
    assert model.weight.grad is not None  # the good micro-batch ran; the bad one never reached backward
    assert torch.isfinite(model.weight.grad).all()


def test_one_batch_without_the_window_bookkeeping_gives_the_same_gradient_to_the_bit(texts: list[str]) -> None:
    """The trainer's common step (one process, one micro-batch) skips accumulate_gradients' window bookkeeping:
    the same loss and the same gradients, bit for bit, as a window of that one batch, and the mean loss's."""
    torch.manual_seed(0)
    model = TokenTagger()
    batch = encode(texts)
    loss = backward_batch(model, batch, token_loss_sum, count_tokens)
    lean = grads(model)
    window = accumulate_gradients(model, [batch], token_loss_sum, count=count_tokens)
    general = grads(model)
    mean = token_loss_sum(model, batch) / count_tokens(batch)
    mean.backward()
    reference = grads(model)

    assert loss == window.loss == pytest.approx(float(mean.detach()), rel=1e-6)
    for a, b, c in zip(lean, general, reference, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)

    bad = encode(texts[:2])
    model.embed.weight.data[bad["ids"][1, 0]] = float("nan")  # a word of the second row embeds as NaN
    with pytest.raises(NonFiniteLoss, match="the loss is nan"):
        backward_batch(model, bad, token_loss_sum, count_tokens)
    assert all(p.grad is None for p in model.parameters())  # stopped before its backward


def _one_step_weights(make_settings: Callable[..., TrainSettings], tmp: Path, **kw: Any) -> dict[str, torch.Tensor]:
    settings = make_settings(
        dataset="digits", max_steps=1, checkpoint_dir=str(tmp), optimizer="sgd", lr=0.5, momentum=0.0, **kw
    )
    train(settings)
    state: dict[str, torch.Tensor] = Checkpointer(tmp).load()["model"]
    return state


def test_trainer_accumulating_two_half_batches_equals_one_full_batch(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    """Through the whole trainer: 2 x 16 rows accumulated == 1 x 32 rows (the sampler cuts the same rows)."""
    big = _one_step_weights(make_settings, tmp_path / "big", batch_size=32, grad_accum_steps=1)
    accumulated = _one_step_weights(make_settings, tmp_path / "acc", batch_size=16, grad_accum_steps=2)
    for key, value in big.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-6)
    # and the comparison can fail: one step on only the first 16 rows lands elsewhere
    half = _one_step_weights(make_settings, tmp_path / "half", batch_size=16, grad_accum_steps=1)
    assert not all(torch.allclose(half[k], v, rtol=1e-3, atol=1e-5) for k, v in big.items())
