"""Sample design knobs: each checked on the exact text it renders and the loss mask it trains, and the parser
that reads answers back (every error type)."""

import pytest
from transformers import AutoTokenizer

from distune.config import ConfigError, DataSection, DesignSection, load_config
from distune.data import IGNORE, DataError, Renderer
from distune.data.design import Design


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


ROW = {"text": "The pasta was great but the waiter was rude.", "food": "positive", "service": "negative",
       "price": "", "rationale": "Pasta praised; waiter criticised."}
ASPECTS = ["food", "service", "price"]
LABELS = ["negative", "neutral", "positive"]


def design(**kw) -> Design:
    labels = kw.pop("labels", LABELS)
    return Design(DesignSection(**kw), labels, seed=0)


def renderer(tok, **data) -> Renderer:
    return Renderer(tok, DataSection(path="x", use_chat_template=False, **data), "x")


@pytest.mark.parametrize("fmt, text", [
    ("lines", "food: positive\nservice: negative"),
    ("json", '{"food": "positive", "service": "negative"}'),
    ("natural", "The food is positive. The service is negative."),
])
def test_output_formats_omit_unmentioned(fmt, text):
    d = design(aspects=ASPECTS, output_format=fmt)
    assert d.target(None, ROW, None, "x line 1") == text


@pytest.mark.parametrize("fmt, text", [
    ("lines", "food: positive\nservice: negative\nprice: none"),
    ("json", '{"food": "positive", "service": "negative", "price": "none"}'),
    ("natural", "The food is positive. The service is negative. The price is none."),
])
def test_placeholder_for_unmentioned_aspects(fmt, text):
    d = design(aspects=ASPECTS, output_format=fmt, unmentioned="placeholder")
    assert d.target(None, ROW, None, "x line 1") == text


def test_numeric_labels_and_list_values():
    d = design(aspects=ASPECTS, label_format="numeric", unmentioned="placeholder", placeholder="-")
    assert d.target(None, ROW, None, "w") == "food: 2\nservice: 0\nprice: -"
    ner = design(aspects=["PER", "LOC"], output_format="json", labels=None)
    assert ner.target(None, {"PER": ["Ann", "Bo"], "LOC": []}, None, "w") == '{"PER": ["Ann", "Bo"]}'
    assert design(aspects=["PER"], labels=None).target(None, {"PER": ["Ann", "Bo"]}, None, "w") == "PER: Ann, Bo"
    with pytest.raises(DataError, match="f.csv line 3: 'great' is not one of data.labels"):
        design(label_format="numeric").target("great", {}, None, "f.csv line 3")


def test_cot_puts_the_rationale_before_the_answer():
    d = design(aspects=ASPECTS, reasoning="cot")
    assert d.target(None, ROW, "Pasta praised.", "w") == "Pasta praised.\nAnswer:\nfood: positive\nservice: negative"
    assert design(reasoning="cot").target("positive", {}, "Nice.", "w") == "Nice.\nAnswer: positive"


def test_instruction_first_or_last_and_phrasings_sampled_per_row(tok):
    first = renderer(tok, prompt="Review: {text}", response="{food}", design={"instruction": "Rate the food."})
    assert first.prompt_text(1, ROW) == "Rate the food.\n\nReview: " + ROW["text"]
    last = renderer(tok, prompt="Review: {text}", response="{food}",
                    design={"instruction": "Rate the food.", "instruction_position": "last"})
    assert last.prompt_text(1, ROW) == "Review: " + ROW["text"] + "\n\nRate the food."
    many = renderer(tok, prompt="{text}", response="{food}", design={"instruction": ["A.", "B.", "C."]})
    drawn = [many.prompt_text(line, ROW).split("\n")[0] for line in range(60)]
    assert set(drawn) == {"A.", "B.", "C."}                               # every phrasing is used
    assert drawn == [many.prompt_text(line, ROW).split("\n")[0] for line in range(60)]  # same per row, every time
    assert {many.prompt_text(line, ROW, canonical=True).split("\n")[0] for line in range(60)} == {"A."}  # eval rows


def test_input_modelling_off_trains_only_the_target(tok):
    off = renderer(tok, prompt="{text}", design={"aspects": ASPECTS})
    s = off.render(1, ROW)
    trained = tok.decode([t for t in s.labels if t != IGNORE])
    assert trained.startswith("food: positive\nservice: negative") and ROW["text"] not in trained
    on = renderer(tok, prompt="{text}", design={"aspects": ASPECTS}, train_on_inputs=True).render(1, ROW)
    assert IGNORE not in on.labels and on.input_ids == s.input_ids


def test_missing_aspect_column_names_the_line(tok):
    with pytest.raises(DataError, match="x line 4: data.design.aspects names column 'price'"):
        renderer(tok, prompt="{text}", design={"aspects": ["food", "price"]}).render(4, {"text": "t", "food": "a"})


def test_design_config_errors_name_the_key(tiny_model, tiny_data):
    base = {"model": {"path": str(tiny_model)}, "data": {"path": str(tiny_data)}}
    with pytest.raises(ConfigError, match="data.design.label_format: numeric .* set data.labels"):
        load_config(base, ["data.design.label_format=numeric"])
    with pytest.raises(ConfigError, match="data.design.instruction: applies to single-turn formats"):
        load_config(base, ["data.format=messages", "data.design.instruction=hi"])
    with pytest.raises(ConfigError, match="data.design.output_format"):
        load_config(base, ["data.design.output_format=yaml"])
    with pytest.raises(ConfigError, match="data.design.aspects: .*distinct"):
        load_config(base, ["data.design.aspects=[a,a]"])


# -- parsing answers back: every error type ----------------------------------------------------------

@pytest.mark.parametrize("fmt", ["lines", "json", "natural"])
def test_parse_inverts_render(fmt):
    for unmentioned in ("omit", "placeholder"):
        d = design(aspects=ASPECTS, output_format=fmt, unmentioned=unmentioned)
        got = d.parse(d.target(None, ROW, None, "w"))
        assert got.errors == [] and got.values == {"food": "positive", "service": "negative", "price": None}
    ner = design(aspects=["PER", "LOC"], output_format=fmt, labels=None)
    assert ner.parse(ner.target(None, {"PER": ["Ann", "Bo"], "LOC": "Oslo"}, None, "w")).values == {
        "PER": ["Ann", "Bo"], "LOC": "Oslo"}


def test_parse_error_types():
    lines = design(aspects=ASPECTS, unmentioned="placeholder")
    assert lines.parse("I think the food was good").errors == ["unparseable"]
    assert lines.parse("food: positive\nservice: negative").errors == ["missing_aspect"]
    assert lines.parse("food: tasty\nservice: negative\nprice: none").errors == ["invalid_label"]
    assert lines.parse("Sure! Here it is:\nfood: positive\nservice: negative\nprice: none").errors == ["extra_text"]
    js = design(aspects=ASPECTS, output_format="json")
    assert js.parse('{"food": "positive",').errors == ["unparseable"]
    assert js.parse('Result: {"food": "positive"}').errors == ["extra_text"]
    single = design()
    assert single.parse("positive").values == {"label": "positive"} and single.parse("positive").errors == []
    assert single.parse("Positive, clearly.").errors == ["extra_text"]
    assert single.parse("great").errors == ["invalid_label"]
    found = single.parse("The sentiment of this tweet is neutral, not negative.")  # first label named, counted
    assert found.values == {"label": "neutral"} and found.errors == ["extra_text"]
    assert single.parse("I'd call it non-negativeish").errors == ["invalid_label"]  # whole words only
    numeric = design(label_format="numeric")
    assert numeric.parse("2").values == {"label": "positive"}
    cot = design(reasoning="cot")
    assert cot.parse("The tweet is happy.\nAnswer: positive").values == {"label": "positive"}
    assert cot.parse("The tweet is happy, so positive").errors == ["unparseable"]
