"""The counting model of Chapter 1 against counts kept in plain Python Counters."""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from buildllm.ngram import NGramModel, run_codes


def reference_prob(ids: list[int], order: int, V: int, k: float):
    """Add-k n-gram probabilities from plain Counters: an independent implementation."""
    runs = Counter(tuple(ids[i : i + order]) for i in range(len(ids) - order + 1))
    contexts = Counter()
    for run, n in runs.items():
        contexts[run[:-1]] += n

    def prob(context: tuple[int, ...], token: int) -> float:
        total = contexts[context] + k * V
        return (runs[(*context, token)] + k) / total if total else 1 / V

    return prob


def random_ids(n: int, V: int, seed: int) -> list[int]:
    # Skewed, so that some runs are frequent and many never occur.
    g = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, V + 1.0) ** 2
    return torch.multinomial(weights, n, True, generator=g).tolist()


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("smoothing", [0.5, 1.0])
def test_loss_and_probs_equal_counters(order, smoothing):
    V = 7
    train, val = random_ids(3000, V, 0), random_ids(500, V, 1)
    model = NGramModel.fit(train, order, V, smoothing)
    prob = reference_prob(train, order, V, smoothing)
    expected = -sum(
        math.log(prob(tuple(val[t - order + 1 : t]), val[t]))
        for t in range(order - 1, len(val))
    ) / (len(val) - order + 1)
    assert model.loss(val) == pytest.approx(expected, rel=1e-12)
    for context in [tuple(val[:order - 1]), (0,) * (order - 1)]:  # a common, a rare one
        p = model.probs(list(context))
        assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
        expected_p = [prob(context, b) for b in range(V)]
        assert p.tolist() == pytest.approx(expected_p, rel=1e-12)


def test_unsmoothed_bigram_on_its_training_text_is_its_conditional_entropy():
    V = 6
    ids = random_ids(4000, V, 2)
    pairs = Counter(zip(ids, ids[1:]))
    firsts = Counter(ids[:-1])
    entropy = -sum(n * math.log(n / firsts[a]) for (a, _), n in pairs.items()) / sum(
        pairs.values()
    )
    model = NGramModel.fit(ids, 2, V, 0.0)
    assert model.loss(ids) == pytest.approx(entropy, rel=1e-12)
    # The same number is torch's cross-entropy of the log of the table of probabilities.
    table = torch.stack([model.probs([a]) for a in range(V)])
    x, y = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
    torch_loss = F.cross_entropy(table.log()[x], y)
    assert model.loss(ids) == pytest.approx(torch_loss.item(), rel=1e-12)


def test_unseen_pair_without_smoothing_is_infinite_and_unseen_context_is_uniform():
    model = NGramModel.fit([0, 1, 0, 1, 0], 2, 3, 0.0)
    assert model.loss([0, 1, 1]) == math.inf  # 1 -> 1 never seen
    assert model.probs([2]).tolist() == pytest.approx([1 / 3] * 3)  # 2 never a context


def test_sample_follows_the_model():
    V = 4
    ids = random_ids(5000, V, 3)
    model = NGramModel.fit(ids, 2, V, 1.0)
    g = torch.Generator().manual_seed(0)
    out = model.sample([3], 20000, g)
    assert out[0] == 3 and len(out) == 20001
    pairs, firsts = Counter(zip(out, out[1:])), Counter(out[:-1])
    for a in range(V):
        expected = model.probs([a])
        for b in range(V):
            share = pairs[a, b] / firsts[a]
            assert share == pytest.approx(expected[b].item(), abs=0.03)


def test_run_codes_are_base_v_numbers():
    ids = torch.tensor([3, 1, 4, 1, 5])
    assert run_codes(ids, 3, 10).tolist() == [314, 141, 415]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"order": 0}, "order must be at least 1"),
        ({"smoothing": -1.0}, "smoothing must be >= 0"),
        ({"smoothing": math.nan}, "smoothing must be >= 0"),
        ({"order": 8, "vocab_size": 256}, "lower order to 7"),
        ({"vocab_size": 3}, r"outside 0\.\.2 \(vocab_size\)"),
        ({"order": 6}, "fewer than order=6"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NGramModel.fit([0, 1, 2, 3, 1], **{"vocab_size": 5, **kwargs})


def test_short_context_is_refused():
    model = NGramModel.fit([0, 1, 2, 0, 1, 2], 3, 3)
    with pytest.raises(ValueError, match="at least order - 1 = 2"):
        model.probs([1])
