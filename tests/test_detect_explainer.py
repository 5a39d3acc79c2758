"""ARMOR's detector-explainer: no explanation loss where no explanation exists (its gradient and value ignore sparse
rows), and on a synthetic task whose frames show the cause, the recipe learns to detect and to explain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from afil_ray.detect.armor import RECIPES, ArmorSettings, ExplainerBatch, Recipe, infer, train
from afil_ray.detect.explainer import (
    NO_DETECTION,
    DetectorExplainer,
    ExplainerShape,
    ExplanationTokenizer,
    heterogeneous_loss,
)

SHAPE = ExplainerShape(feature_dim=8, frames=4, width=32, encoder_layers=1, decoder_layers=1, heads=2,
                       max_tokens=12)


CAUSES = ["the cube was dropped", "the gripper missed the cube", "the task was completed"]


@pytest.fixture(scope="module")
def tokenizer() -> ExplanationTokenizer:
    return ExplanationTokenizer(SHAPE.max_tokens, [*CAUSES, "it worked", "the arm stopped", "the grasp missed"])


def _model(tokenizer: ExplanationTokenizer) -> DetectorExplainer:
    torch.manual_seed(0)
    return DetectorExplainer(SHAPE, tokenizer.vocab_size, tokenizer.pad)


def _history(batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.full((batch,), NO_DETECTION), torch.zeros(batch, SHAPE.max_tokens, dtype=torch.long),
            torch.zeros(batch, SHAPE.max_tokens, dtype=torch.bool))


def test_sparse_rows_put_nothing_into_the_explanation_loss(tokenizer):
    model = _model(tokenizer).eval()  # no dropout: the two losses are comparable
    frames = torch.randn(4, SHAPE.frames, SHAPE.feature_dim)
    failed = torch.tensor([True, False, True, False])
    ids, _ = tokenizer.encode(["the cube fell", "it worked", "the grasp missed", "the arm stopped"])
    dense = torch.tensor([True, False, False, False])

    def loss_with(targets: torch.Tensor, dense: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        logit, token_loss, _ = model(frames, *_history(4), targets)
        loss, _ = heterogeneous_loss(logit, failed, token_loss, dense)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.decoder.named_parameters() if p.grad is not None}
        return float(loss.detach()), grads

    base, _ = loss_with(ids, dense)
    scrambled = ids.clone()
    scrambled[1:, 1:4] = 5  # other words where the sparse rows' explanations would be
    again, _ = loss_with(scrambled, dense)
    assert again == pytest.approx(base, rel=1e-6)
    _, grads = loss_with(ids, torch.zeros(4, dtype=torch.bool))
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())  # detection alone never reaches the decoder
    _, grads = loss_with(ids, dense)
    assert any(float(g.abs().max()) > 0.0 for g in grads.values())


def _synthetic(n: int, seed: int, tokenizer: ExplanationTokenizer, dense_share: float) -> tuple[ExplainerBatch,
                                                                                                  np.ndarray]:
    """Episodes whose frames carry their cause (a one-hot in the last frame, under noise); cause 2 is success."""
    rng = np.random.default_rng(seed)
    cause = rng.integers(0, 3, n)
    frames = rng.normal(0, 0.3, (n, SHAPE.frames, SHAPE.feature_dim)).astype(np.float32)
    frames[np.arange(n), -1, cause] += 2.0
    dense = rng.random(n) < dense_share
    ids, mask = tokenizer.encode([CAUSES[c] if d else None for c, d in zip(cause, dense, strict=True)])
    batch = ExplainerBatch(torch.from_numpy(frames), torch.from_numpy(cause != 2), torch.from_numpy(dense), ids,
                           mask)
    return batch, cause


@pytest.mark.parametrize("recipe", ["multitask", "armor"])
def test_the_recipe_learns_to_detect_and_explain(tokenizer, recipe):
    data, _ = _synthetic(240, 0, tokenizer, dense_share=1 / 3)  # sparse:dense = 2
    settings = ArmorSettings(warmup_epochs=30, online_epochs=3, batch_size=32, lr=1e-2, max_rounds=2,
                             trajectories=2)
    model = _model(tokenizer)
    log = train(model, data, tokenizer, RECIPES[recipe], settings)
    assert log[-1]["detection_loss"] < 0.5 * log[0]["detection_loss"]
    test, cause = _synthetic(60, 1, tokenizer, dense_share=1.0)
    # what the model learned: one greedy round from an empty history
    out = infer(model, test.frames, tokenizer, Recipe(conditioned=False, online=False, refine=False), settings)
    detected = np.array([o.failure_probability > 0.5 for o in out])
    assert (detected == (cause != 2)).mean() > 0.9
    said = np.array([o.text == CAUSES[c] for o, c in zip(out, cause, strict=True)])
    if recipe == "multitask":
        assert said.mean() > 0.8, [o.text for o in out[:5]]
    else:  # with its online phase the explanation of two causes can merge at this toy scale: 0.97 with 2 torch
        # threads, 0.6 with 1 (issue 23's note); that it still writes one of the causes' texts is asserted
        assert set(o.text for o in out) <= set(CAUSES), [o.text for o in out[:5]]
    # the recipe's own inference runs its rounds and keeps a lowest-certainty-score answer per episode (on a model
    # this small a sampled trajectory can win the vote with a wrong explanation, and the online phase's outcome
    # depends on float reduction order: its accuracy is measured in docs/results.md, not asserted here)
    refined = infer(model, test.frames, tokenizer, RECIPES[recipe], settings)
    assert all(1 <= o.rounds <= settings.max_rounds for o in refined)
    assert all(0.0 <= o.failure_probability <= 1.0 and np.isfinite(o.certainty_score) for o in refined)
