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


def test_the_prompt_runs_once_and_scores_equal_a_row_per_choice(world_of_one, tiny_model):
    from distune.tasks.choices import _choice_rows_scores, choice_scores

    tok, model, samples, choices, choice_ids = _setup(tiny_model)
    model.eval()
    multi = [ids + [tok.eos_token_id] for ids in choice_ids] + [choice_ids[0][:1]]  # lengths differ
    single = [[ids[0]] for ids in multi]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(tuple(k["input_ids"].shape)),
                                           with_kwargs=True)
    heads = []  # the output head's input per forward: the prompt's runs on its last position only
    head_hook = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: heads.append(a[0].shape[1]))
    with torch.no_grad():
        for options in (multi, single):
            calls.clear()
            heads.clear()
            got, got_counts = choice_scores(model, samples, options, tok.pad_token_id, torch.device("cpu"))
            prompt_width = max(len(s.prompt_ids) for s in samples)
            longest = max(map(len, options))
            # The prompts once; then only the choices' tokens, one row per (sample, choice); none for one token.
            assert calls == [(len(samples), prompt_width)] + (
                [(len(samples) * len(options), longest)] if longest > 1 else [])
            assert heads == [1] + ([longest] if longest > 1 else [])
            want, want_counts = _choice_rows_scores(model, samples, options, tok.pad_token_id, torch.device("cpu"))
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            assert torch.equal(got_counts, want_counts)
    hook.remove()
    head_hook.remove()


def test_eval_scores_do_not_depend_on_sample_order(world_of_one, tiny_model):
    """evaluate() batches the longest samples first; its weighted sums must not see the order."""
    tok, model, samples, choices, choice_ids = _setup(tiny_model)
    args = (3, tok.pad_token_id, torch.device("cpu"), 0, 1, choices, choice_ids)
    forward, backward = evaluate(model, samples, *args), evaluate(model, samples[::-1], *args)
    assert forward["eval/accuracy"] == backward["eval/accuracy"]
    assert abs(forward["eval/loss"] - backward["eval/loss"]) < 1e-5


def test_models_that_take_no_position_ids_score_a_row_per_choice(world_of_one, tiny_model):
    """Left-padded prompts need explicit positions; a forward without position_ids (ALiBi models) gets rows."""
    from distune.tasks.choices import _choice_rows_scores, choice_scores

    tok, model, samples, choices, choice_ids = _setup(tiny_model)
    model.eval()
    forward = model.forward
    model.forward = lambda input_ids=None, attention_mask=None, **kw: forward(input_ids=input_ids,
                                                                             attention_mask=attention_mask)
    with torch.no_grad():
        got, _ = choice_scores(model, samples, choice_ids, tok.pad_token_id, torch.device("cpu"))
        want, _ = _choice_rows_scores(model, samples, choice_ids, tok.pad_token_id, torch.device("cpu"))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
