"""distune eval's pieces without Ray: prompts of every mode, demonstration selection, the vote, the metrics
(against hand-computed values)."""

import pytest
from transformers import AutoTokenizer

from distune.config import DataSection
from distune.data import Renderer
from distune.data.design import Parsed
from distune.eval.metrics import macro_f1, score
from distune.eval.prompts import COT_INSTRUCTION, Example, PromptBuilder, majority, nearest

TRAIN = [Example(i, {"text": t, "label": lab}) for i, (t, lab) in enumerate(
    [("I love this film", "positive"), ("awful service", "negative"), ("the bus is late again", "negative"),
     ("what a great day", "positive"), ("best pasta in town", "positive"), ("rude waiter", "negative")], start=10)]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def _builder(tok, select="random", neighbours=None, **data):
    cfg = DataSection(path="x", prompt="Tweet: {text}", response="{label}", labels=["negative", "positive"],
                      design={"instruction": "Label the sentiment."}, **data)
    return PromptBuilder(Renderer(tok, cfg, "x"), TRAIN, 2, select, 0, neighbours)


def test_modes_render_instruction_demonstrations_and_cot(tok):
    b = _builder(tok)
    q = Example(99, {"text": "so happy", "label": "positive"})
    zero = tok.decode(b.prompt("zero_shot", 0, q))
    assert zero.count("Label the sentiment.") == 1 and "Tweet: so happy" in zero
    assert b.prompt("zero_shot", 0, q) == b.r.pair(b.r.prompt_text(99, q.row, canonical=True), "")[0]  # = training
    few = tok.decode(b.prompt("few_shot", 0, q))
    demos = b.demos(0, q)
    assert few.count("Label the sentiment.") == 3 and few.rstrip().endswith("<|assistant|>")
    for d in demos:
        assert f"Tweet: {d.row['text']}" in few and f"<|assistant|>{d.row['label']}<|end|>" in few
    assert demos == b.demos(0, q) and q not in demos  # seeded per query; never the query itself (train rows)
    cot = tok.decode(b.prompt("few_shot_cot", 0, q))
    assert cot.count(COT_INSTRUCTION) == 3 and f"Answer: {demos[0].row['label']}" in cot
    searched = tok.decode(b.prompt("zero_shot", 0, q, instruction="Say if it is happy."))
    assert "Say if it is happy." in searched and "Label the sentiment." not in searched


def test_cot_demonstrations_use_rationales_when_the_data_has_them(tok):
    b = _builder(tok)
    ex = Example(1, {"text": "t", "label": "positive", "rationale": "Upbeat words."})
    assert b.cot_target(ex) == "Upbeat words.\nAnswer: positive"
    assert b.cot_target(Example(2, {"text": "t", "label": "negative"})) == "Answer: negative"


def test_nearest_demonstrations_put_the_most_similar_last(tok, tiny_model):
    pool = [e.row["text"] for e in TRAIN]
    queries = ["rude waiter", "I love this film"]
    nb = nearest(queries, pool, str(tiny_model), k=2)
    assert nb[0][0] == 5 and nb[1][0] == 0  # an identical text is its own nearest neighbour
    b = _builder(tok, select="nearest", neighbours=nb)
    assert b.demos(0, Example(1, {"text": "rude waiter"}))[-1] is TRAIN[5]


def test_self_consistency_vote():
    p = lambda label, errors=(): Parsed({"label": label}, list(errors))  # noqa: E731
    assert majority([p("a"), p("b"), p("b")]).values == {"label": "b"}
    assert majority([p("a"), p("b")]).values == {"label": "a"}  # tie: the earliest drawn
    assert majority([p(None, ["unparseable"])] * 3 + [p("c")]).values == {"label": "c"}  # unparsed don't vote
    assert majority([p(None, ["unparseable"])]).errors == ["unparseable"]


def test_macro_f1_by_hand():
    gold = ["a", "a", "b", "c"]
    pred = ["a", "b", "b", "x"]
    # a: tp1 fp0 fn1 -> 2/3; b: tp1 fp1 fn0 -> 2/3; c: tp0 fp0 fn1 -> 0
    assert macro_f1(gold, pred, ["a", "b", "c"]) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_score_labels_and_entities_by_hand():
    golds = [{"label": "positive"}, {"label": "negative"}, {"label": "positive"}]
    preds = [Parsed({"label": "positive"}), Parsed({"label": "great"}, ["invalid_label"]),
             Parsed({}, ["unparseable"])]
    m = score(golds, preds, ["negative", "positive"])
    assert m["accuracy"] == pytest.approx(1 / 3) and m["format_error_rate"] == pytest.approx(2 / 3)
    assert m["errors"] == {"unparseable": 1, "missing_aspect": 0, "invalid_label": 1, "extra_text": 0}
    # positive: tp1 fn1 -> 2/3; negative: fn1 -> 0; "(none)" (the unparsed one): fp1 -> 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 0) / 3)

    golds = [{"PER": ["Ann", "Bo"], "LOC": None}, {"PER": None, "LOC": "Oslo"}]
    preds = [Parsed({"PER": ["ann"], "LOC": "Paris"}), Parsed({"PER": None, "LOC": "Oslo"})]
    m = score(golds, preds, None)
    # PER: tp1 fn1; LOC: tp1 fp1 -> micro tp2 fp1 fn1
    assert m["entity_precision"] == pytest.approx(2 / 3) and m["entity_recall"] == pytest.approx(2 / 3)
    assert m["entity_f1"] == pytest.approx(2 / 3) and m["exact_match"] == pytest.approx(1 / 2)
    assert m["per_aspect"]["PER"]["recall"] == pytest.approx(1 / 2)
