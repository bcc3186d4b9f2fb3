"""`MaskCountSampling`: LLaDA's count form of the masked-diffusion bound, checked against the default t form."""

import itertools
import math

import pytest
import torch

from llada_v.training.data import IGNORE_INDEX, MaskCountSampling

from tiny import tiny_model


def _batch(rows: int, length: int, supervised: list[int]) -> dict:
    labels = torch.full((rows, length), IGNORE_INDEX)
    labels[:, supervised] = torch.arange(len(supervised)) + 10
    return {"input_ids": torch.arange(length).repeat(rows, 1) + 10, "labels": labels}


def test_masks_a_uniform_count_of_supervised_tokens_with_t_equal_to_the_share():
    supervised = [2, 3, 5, 8]
    sampler = MaskCountSampling(lambda features: _batch(len(features), 10, supervised), seed=0)
    batch = sampler([{}] * 8000)
    masked, t = batch["masked_indices"], batch["masking_t"]
    assert not masked[:, [0, 1, 4, 6, 7, 9]].any()
    counts = masked.sum(-1)
    assert torch.equal(t, counts / len(supervised))
    assert counts.min() == 1 and counts.max() == len(supervised)
    # each count 1..L about equally often, each supervised position masked equally often (5 sigma bounds)
    share = torch.bincount(counts, minlength=5)[1:] / len(counts)
    assert (share - 0.25).abs().max() < 5 * math.sqrt(0.25 * 0.75 / len(counts))
    per_position = masked[:, supervised].float().mean(0)
    assert (per_position - per_position.mean()).abs().max() < 0.03  # mean 0.625


def test_rows_without_supervised_tokens_mask_nothing_and_seeds_reproduce():
    def collate(features):
        batch = _batch(len(features), 6, [1, 2])
        batch["labels"][0] = IGNORE_INDEX
        return batch

    first = MaskCountSampling(collate, seed=3)([{}] * 4)
    again = MaskCountSampling(collate, seed=3)([{}] * 4)
    assert not first["masked_indices"][0].any() and first["masking_t"][0] == 0
    assert torch.equal(first["masked_indices"], again["masked_indices"])
    with pytest.raises(ValueError, match="labels"):
        MaskCountSampling(lambda features: {"input_ids": torch.zeros(1, 2)})([{}])
    with pytest.raises(TypeError, match="callable"):
        MaskCountSampling(None)


@pytest.mark.slow
def test_count_form_has_the_expectation_of_the_default_t_form_with_lower_variance():
    """The model's own loss, averaged over the sampler's masks, equals the exact expectation of the SPEC form
    (t ~ U(0, 1), Bernoulli masks, weight 1 / p_mask) computed by enumerating every mask and integrating t."""
    model = tiny_model(seed=1)
    eps = model.config.diffusion_eps
    supervised = [3, 4, 6]
    one = _batch(1, 8, supervised)
    L = len(supervised)

    def loss(masked_positions, t):
        masked = torch.zeros(1, 8, dtype=torch.bool)
        masked[0, list(masked_positions)] = True
        with torch.no_grad():
            return float(model(**one, masking_t=torch.tensor([t]), masked_indices=masked).loss)

    # SPEC form: each token masked with p = (1 - eps) t + eps, t ~ U(0, 1); loss(M, t) = sum_{i in M} CE_i(M) / p / L.
    # p * loss(M, t) does not depend on t, so E = sum_M [p * loss](M) * integral p^|M| (1-p)^(L-|M|) / p dt.
    grid = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    p = (1 - eps) * grid + eps
    expected = 0.0
    for size in range(1, L + 1):
        weight = float((p**size * (1 - p) ** (L - size) / p).mean())
        for subset in itertools.combinations(supervised, size):
            expected += loss(subset, 1.0) * weight  # t = 1: p = 1, so this is sum CE_i / L

    rows = 6000
    sampler = MaskCountSampling(lambda features: _batch(len(features), 8, supervised), seed=0)
    batch = sampler([{}] * rows)
    chunks = []
    for part in range(20):
        piece = slice(part * rows // 20, (part + 1) * rows // 20)
        with torch.no_grad():
            out = model(
                input_ids=batch["input_ids"][piece],
                labels=batch["labels"][piece],
                masking_t=batch["masking_t"][piece],
                masked_indices=batch["masked_indices"][piece],
            )
        chunks.append(float(out.loss))
    chunks = torch.tensor(chunks)
    mean, stderr = float(chunks.mean()), float(chunks.std() / math.sqrt(len(chunks)))
    assert abs(mean - expected) < 4 * stderr + 1e-3 * expected, (mean, expected, stderr)

    # and the default draws (t ~ U(0, 1) inside the model) scatter far more across equally sized chunks
    default = []
    torch.manual_seed(0)
    for part in range(20):
        with torch.no_grad():
            default.append(float(model(**_batch(rows // 20, 8, supervised)).loss))
    assert torch.tensor(default).std() > 2 * chunks.std()
