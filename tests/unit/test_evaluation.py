import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny
from distune.config import DataSection
from distune.data import Renderer
from distune.evaluation import evaluate


def _setup(tiny_model, **data):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    r = Renderer(tok, DataSection(path="x", prompt="Sentiment: {text}", response="{label}", **data), "x")
    rows = tiny.sentiment_rows(7, seed=5)
    samples = [r.render(i, row) for i, row in enumerate(rows)]
    choices = ["positive", "negative"]
    return tok, model, samples, choices, [r.pair("", c)[1] for c in choices]


def _hand_eval(model, samples, choices, choice_ids):
    """Per-sample loop, no batching, no shortcuts."""
    nll, n, correct = 0.0, 0, 0
    for s in samples:
        scores = []
        for ids in choice_ids:
            seq = torch.tensor([s.prompt_ids + ids])
            logp = torch.log_softmax(model(seq).logits[0, :-1], -1)
            pos = range(len(s.prompt_ids) - 1, len(s.prompt_ids) - 1 + len(ids))
            scores.append(sum(logp[p, t].item() for p, t in zip(pos, ids)))
        gold = choices.index(s.response)
        correct += max(range(len(scores)), key=scores.__getitem__) == gold
        nll -= scores[gold]
        n += len(choice_ids[gold])
    return nll / n, correct / len(samples)


def test_eval_matches_per_sample_hand_computation(world_of_one, tiny_model):
    tok, model, samples, choices, choice_ids = _setup(tiny_model)
    got = evaluate(model, samples, micro_batch=3, pad_id=tok.pad_token_id, device=torch.device("cpu"), rank=0,
                   world=1, choices=choices, choice_ids=choice_ids)
    loss, acc = _hand_eval(model, samples, choices, choice_ids)
    assert abs(got["eval/loss"] - loss) < 1e-4 and got["eval/accuracy"] == acc


def test_eval_loss_without_shortcut_is_the_same(world_of_one, tiny_model):
    tok, model, samples, choices, choice_ids = _setup(tiny_model)
    plain = evaluate(model, samples, 3, tok.pad_token_id, torch.device("cpu"), 0, 1)
    with_choices = evaluate(model, samples, 3, tok.pad_token_id, torch.device("cpu"), 0, 1, choices, choice_ids)
    assert "eval/accuracy" not in plain
    assert abs(plain["eval/loss"] - with_choices["eval/loss"]) < 1e-5


def test_eval_shards_weight_padding_out():
    from distune.data import eval_shard

    samples = list(range(5))
    shards = [eval_shard(samples, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]
    real = sorted(x for shard in shards for x, w in shard if w == 1.0)
    assert real == samples


def test_single_token_choices_take_one_forward_per_sample_with_the_same_scores(world_of_one, tiny_model):
    from distune.evaluation import _choice_rows_scores, choice_scores

    tok, model, samples, choices, choice_ids = _setup(tiny_model)
    model.eval()
    single = [[ids[0]] for ids in choice_ids] + [[tok.eos_token_id]]  # one token each: the fast path
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        fast, fast_counts = choice_scores(model, samples, single, tok.pad_token_id, torch.device("cpu"))
        rows, row_counts = _choice_rows_scores(model, samples, single, tok.pad_token_id, torch.device("cpu"))
    hook.remove()
    assert calls == [len(samples), len(samples) * len(single)]  # one row per sample, then one per (sample, choice)
    torch.testing.assert_close(fast, rows, atol=1e-5, rtol=0)
    assert torch.equal(fast_counts, row_counts)
    # A multi-token choice anywhere takes the row-per-choice path, hand-checked by the test above.
    mixed = single[:1] + [single[1] + single[0]]
    with torch.no_grad():
        scores, counts = choice_scores(model, samples, mixed, tok.pad_token_id, torch.device("cpu"))
    assert counts[:, 1].eq(2).all()
