"""The frozen text encoder: the packaged all-MiniLM-L6-v2, loaded offline, feeding the VideoAR text prefix."""

from __future__ import annotations

import pytest
import torch

from models.text_encoder import TextEncoder
from models.videoar import VideoAR, VideoARConfig


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(max_len=12)


def test_token_states_are_padded_zeroed_and_batch_independent(encoder):
    a = "a red circle moving left over stripes"
    states = encoder.encode([a, "blue square", a])
    assert states.shape == (3, 12, 384) and states.dtype == torch.float32
    n_tokens = len(encoder.tokenizer(a)["input_ids"])
    assert states[0, :n_tokens].abs().sum(-1).min() > 0 and states[0, n_tokens:].abs().sum() == 0
    torch.testing.assert_close(states[0], encoder.encode([a])[0], rtol=0, atol=1e-5)  # same with another batch
    assert (states[0] - states[1]).abs().max() > 0.1


def test_text_prefix_feeds_the_model(encoder):
    cfg = VideoARConfig(preset="custom", depth=1, width=32, heads=2, text_len=12, text_dim=encoder.dim)
    model = VideoAR(cfg, 8)
    prefix = model.prefix(encoder.encode(["green triangle"]), drop=torch.tensor([False]))
    assert prefix.shape == (1, 12, 32)
    assert torch.equal(model.prefix(encoder.encode(["x"]), drop=torch.tensor([True]))[0], model.null_prefix)


def test_unknown_encoder_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        TextEncoder(str(tmp_path / "missing"))
