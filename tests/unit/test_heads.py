"""model.task token_classification / question_answering: alignment, label maps, spans, losses, metrics by hand."""

import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification, AutoTokenizer

import tiny
from distune.config import ConfigError, DataSection, load_config
from distune.data import DataError, collate, load_splits
from distune.tasks.question_answering import render_answer
from distune.tasks.token_classification import render_tags
from distune.data.render import Renderer
from distune.tasks import spans
from distune.evaluation import evaluate
from distune.methods import build_method
from distune.models import load_model
from distune.validate import validate

TAGS = ["B-NEG", "B-POS", "I-NEG", "I-POS", "O"]
NER_COLUMNS = {"tokens": "words", "tags": "ner"}


@pytest.fixture(scope="module")
def enc_tok(tiny_encoder):
    return AutoTokenizer.from_pretrained(tiny_encoder)


@pytest.fixture(scope="module")
def dec_tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def ner_file(tmp_path_factory):
    return tiny.write_jsonl(tmp_path_factory.mktemp("heads") / "ner.jsonl", tiny.ner_rows(48))


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    return tiny.write_jsonl(tmp_path_factory.mktemp("heads") / "qa.jsonl", tiny.qa_rows(48))


def _renderer(tok, **kw):
    return Renderer(tok, DataSection(path="x.jsonl", **kw), "x.jsonl")


# -------------------------------------------------------------------------------------- metrics by hand


def test_entities_bio_io_and_conlleval_starts():
    assert spans.entities(["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4)}
    assert spans.entities(["O", "I-MISC", "I-MISC"]) == {("MISC", 1, 2)}  # I- after O opens an entity
    assert spans.entities(["B-A", "I-B", "I-B"]) == {("A", 0, 0), ("B", 1, 2)}  # a type change splits
    assert spans.entities(["B-geo-loc", "I-geo-loc"]) == {("geo-loc", 0, 1)}
    assert spans.entities(["PER", "PER", "O", "LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}  # IO tags
    assert spans.entities(["O", "O"]) == set()


def test_entity_f1_counts_a_partial_overlap_as_wrong():
    gold = ["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"]
    pred = ["B-PER", "O", "O", "B-LOC", "I-LOC", "B-ORG"]  # PER too short, LOC too long, ORG exact
    assert spans.entity_counts(gold, pred) == (1, 3, 3)
    second = spans.entity_counts(["O", "I-MISC", "I-MISC"], ["O", "B-MISC", "I-MISC"])
    assert second == (1, 1, 1)
    total = [a + b for a, b in zip(spans.entity_counts(gold, pred), second)]
    assert spans.f1(*total) == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    assert spans.f1(0, 0, 0)["f1"] == 1.0 and spans.f1(0, 2, 0)["f1"] == 0.0


def test_squad_normalisation_exact_match_and_f1():
    assert spans.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert spans.exact_match("the eiffel tower", ["Eiffel Tower."]) == 1.0
    assert spans.exact_match("eiffel", ["Eiffel Tower"]) == 0.0
    # pred [eiffel tower in paris] vs gold [eiffel tower]: P = 2/4, R = 2/2 -> F1 = 2/3; vs [paris]: 0.4
    assert spans.token_f1("Eiffel Tower in Paris", ["paris", "the Eiffel Tower"]) == pytest.approx(2 / 3)
    assert spans.token_f1("a", ["the"]) == 1.0  # both normalise to nothing
    assert spans.token_f1("london", ["paris"]) == 0.0


def test_best_span_is_valid_and_bounded():
    start, end = torch.tensor([0.0, 5, 1, 0]), torch.tensor([0.0, 1, 4, 9])
    context = torch.tensor([False, True, True, True])
    assert spans.best_span(start, end, context, max_tokens=3) == (1, 3)  # 5 + 9
    assert spans.best_span(start, end, context, max_tokens=2) == (2, 3)  # (1, 3) too long: 1 + 9
    assert spans.best_span(start, end, torch.tensor([False, True, True, False]), 3) == (1, 2)  # 5 + 4
    # The best start lies after the best end: start <= end wins over the raw maxima.
    assert spans.best_span(torch.tensor([0.0, 0, 0, 5]), torch.tensor([0.0, 5, 0, 0.5]),
                           torch.tensor([False, True, True, True]), 3) == (3, 3)


# ------------------------------------------------------------------------------------------- data


def test_first_subtoken_of_each_word_gets_the_tag(enc_tok, dec_tok):
    row = {"words": ["it", "greatfun", "was", "sad"], "ner": ["O", "B-POS", "I-POS", "B-NEG"]}
    # BERT WordPiece: [CLS] it great ##fu ##n was sad [SEP] (the tiny vocabulary's training may also pick
    # ##f ##u ##n: the continuation pieces vary, the rule does not)
    s = render_tags(_renderer(enc_tok, columns=NER_COLUMNS), 1, row, TAGS)
    tokens = enc_tok.convert_ids_to_tokens(s.input_ids)
    pieces = tokens[3:-3]
    assert tokens[:3] == ["[CLS]", "it", "great"] and tokens[-3:] == ["was", "sad", "[SEP]"]
    assert pieces and all(p.startswith("##") for p in pieces)
    assert s.tags == [-100, 4, 1] + [-100] * len(pieces) + [3, 0, -100]
    # Byte-level BPE, no special tokens added; words after the first keep their leading space (Ġ), as in the
    # running text "it greatfun was sad"
    s = render_tags(_renderer(dec_tok, columns=NER_COLUMNS), 1, row, TAGS)
    assert dec_tok.convert_ids_to_tokens(s.input_ids) == dec_tok.tokenize("it greatfun was sad")
    assert dec_tok.convert_ids_to_tokens(s.input_ids) == ["it", "Ġgreat", "fun", "Ġwas", "Ġsad"]
    assert s.tags == [4, 1, -100, 3, 0]
    # Truncation keeps the words that fit; the cut ones are not labelled.
    s = render_tags(_renderer(enc_tok, columns=NER_COLUMNS, max_length=4), 1, row, TAGS)
    assert s.tags == [-100, 4, 1, -100]


def test_tag_map_from_the_data_sorted_or_data_labels(enc_tok, ner_file):
    splits = load_splits(DataSection(path=str(ner_file), columns=NER_COLUMNS, eval_size=8), enc_tok, 0,
                         task="token_classification")
    assert splits.labels == TAGS and splits.stats["tags"] == 5
    batch = collate(splits.train[:3], enc_tok.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "tag_labels"}
    assert (batch["tag_labels"][batch["attention_mask"] == 0] == -100).all()
    order = ["O", "B-POS", "I-POS", "B-NEG", "I-NEG", "B-OTHER"]  # data.labels: the order (and extra tags) kept
    splits = load_splits(DataSection(path=str(ner_file), columns=NER_COLUMNS, eval_size=8, labels=order), enc_tok, 0,
                         task="token_classification")
    assert splits.labels == order


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["ner"].pop(), r"line 3: \d tokens but \d tags"),
    (lambda r: r["ner"].__setitem__(0, "B-XYZ"), r"line 3: tag 'B-XYZ' is not one of data.labels"),
    (lambda r: r.pop("ner"), r"line 3: data.columns.tags names column 'ner'"),
    (lambda r: r.__setitem__("words", "it was"), r"line 3: token_classification rows need a list of strings in 'tokens'"),
])
def test_bad_tag_rows_name_the_line(enc_tok, tmp_path, edit, message):
    rows = tiny.ner_rows(10)
    edit(rows[2])
    path = tiny.write_jsonl(tmp_path / "ner.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_splits(DataSection(path=str(path), columns=NER_COLUMNS, eval_size=2, labels=TAGS), enc_tok, 0,
                    task="token_classification")


def test_answer_span_offsets_both_row_shapes(enc_tok, dec_tok):
    nested = {"question": "good", "context": "it was very great fun",
              "answers": {"text": ["very great", "great"], "answer_start": [7, 12]}}
    flat = {"question": "good", "context": "it was very great fun", "answer": "very great", "answer_start": 7}
    for tok, first in ((enc_tok, 5), (dec_tok, 3)):  # [CLS] good [SEP] it was | very great  /  good it was | very
        s = render_answer(_renderer(tok), 1, nested)
        assert (s.span.start, s.span.end) == (first, first + 1)
        assert s.span.context[s.span.offsets[first][0]:s.span.offsets[first + 1][1]].strip() == "very great"
        assert s.span.answers == ["very great", "great"]
        assert all(o is None for o in s.span.offsets[:first - 2])  # the question is not context
        again = render_answer(_renderer(tok), 1, flat)
        assert (again.input_ids, again.span.start, again.span.end) == (s.input_ids, s.span.start, s.span.end)
    assert render_answer(_renderer(enc_tok), 1, nested).token_type_ids == [0, 0, 0, 1, 1, 1, 1, 1, 1]


def test_answer_cut_by_truncation_is_dropped_and_counted(enc_tok, tmp_path):
    rows = tiny.qa_rows(20)
    rows[4] = {"question": "good", "context": "it was the day and the food was very so really great",
               "answers": {"text": ["great"], "answer_start": [47]}}
    path = tiny.write_jsonl(tmp_path / "qa.jsonl", rows)
    splits = load_splits(DataSection(path=str(path), eval_size=2, max_length=12), enc_tok, 0,
                         task="question_answering")
    assert splits.stats["answers_cut"] == 1 and len(splits.train) + len(splits.eval) == 19
    assert "1 rows dropped" in splits.warnings[0] and "qa.jsonl line 5" in splits.warnings[0]


@pytest.mark.parametrize("row, message", [
    ({"question": "good", "context": "it was great", "answer": "great", "answer_start": 3},
     r"line 1: answer 'great' is not at answer_start 3 of the context \(found 'was g'\)"),
    ({"question": "good", "context": "it was great", "answers": {"text": [], "answer_start": []}},
     "line 1: no answer text"),
    ({"question": "good", "text": "it was great", "answer": "great", "answer_start": 7},
     "line 1: question_answering rows need string 'question' and 'context' columns"),
    ({"question": "good", "context": "it was great", "answer": "great"},
     "line 1: question_answering rows need 'answers"),
])
def test_bad_answer_rows_name_the_line(enc_tok, row, message):
    with pytest.raises(DataError, match=message):
        render_answer(_renderer(enc_tok), 1, row)


# ------------------------------------------------------------------------------------ loss and eval


def test_head_losses_match_hand_computation(enc_tok, tiny_encoder, ner_file, qa_file):
    full = build_method("full", {})
    splits = load_splits(DataSection(path=str(ner_file), columns=NER_COLUMNS, eval_size=8), enc_tok, 0,
                         task="token_classification")
    model = load_model(str(tiny_encoder), labels=splits.labels, task="token_classification").eval()
    batch = collate(splits.train[:4], enc_tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    picked = [torch.log_softmax(logits[i, t], -1)[tag] for i, s in enumerate(splits.train[:4])
              for t, tag in enumerate(s.tags) if tag != -100]
    out = full.loss(model, batch, {})
    assert out.loss.item() == pytest.approx(-torch.stack(picked).mean().item(), rel=1e-5)
    assert out.metrics["trained_tokens"].item() == len(picked)

    splits = load_splits(DataSection(path=str(qa_file), eval_size=8), enc_tok, 0, task="question_answering")
    model = load_model(str(tiny_encoder), task="question_answering").eval()
    batch = collate(splits.train[:3], enc_tok.pad_token_id)
    res = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"])
    hand = []
    for i, s in enumerate(splits.train[:3]):
        hand.append(-(torch.log_softmax(res.start_logits[i], -1)[s.span.start]
                      + torch.log_softmax(res.end_logits[i], -1)[s.span.end]) / 2)
    assert full.loss(model, batch, {}).loss.item() == pytest.approx(torch.stack(hand).mean().item(), rel=1e-5)


def test_tag_eval_matches_hand_computation(world_of_one, enc_tok, tiny_encoder, ner_file):
    splits = load_splits(DataSection(path=str(ner_file), columns=NER_COLUMNS, eval_size=8), enc_tok, 0,
                         task="token_classification")
    model = AutoModelForTokenClassification.from_pretrained(tiny_encoder, num_labels=5).eval()
    got = evaluate(model, splits.eval, 3, enc_tok.pad_token_id, torch.device("cpu"), 0, 1, labels=splits.labels)
    nll, correct, n, counts = 0.0, 0, 0, [0, 0, 0]
    with torch.no_grad():
        for s in splits.eval:
            logits = model(input_ids=torch.tensor([s.input_ids])).logits[0]
            kept = [t for t, tag in enumerate(s.tags) if tag != -100]
            gold = [s.tags[t] for t in kept]
            pred = [int(logits[t].argmax()) for t in kept]
            nll -= sum(torch.log_softmax(logits[t], -1)[g].item() for t, g in zip(kept, gold))
            correct, n = correct + sum(g == p for g, p in zip(gold, pred)), n + len(kept)
            c = spans.entity_counts([TAGS[g] for g in gold], [TAGS[p] for p in pred])
            counts = [a + b for a, b in zip(counts, c)]
    assert got["eval/loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["eval/token_accuracy"] == pytest.approx(correct / n)
    assert got["eval/entity_f1"] == pytest.approx(spans.f1(*counts)["f1"])


def test_answer_eval_decodes_the_best_span(world_of_one, enc_tok, tiny_encoder, qa_file):
    splits = load_splits(DataSection(path=str(qa_file), eval_size=8), enc_tok, 0, task="question_answering")
    model = AutoModelForQuestionAnswering.from_pretrained(tiny_encoder).eval()
    got = evaluate(model, splits.eval, 3, enc_tok.pad_token_id, torch.device("cpu"), 0, 1, max_answer_tokens=2)
    em = f1 = 0.0
    with torch.no_grad():
        for s in splits.eval:
            out = model(input_ids=torch.tensor([s.input_ids]), token_type_ids=torch.tensor([s.token_type_ids]))
            best, where = float("-inf"), None
            for i, a in enumerate(s.span.offsets):
                for j, b in enumerate(s.span.offsets):
                    if a and b and i <= j < i + 2 and out.start_logits[0, i] + out.end_logits[0, j] > best:
                        best, where = out.start_logits[0, i] + out.end_logits[0, j], (a[0], b[1])
            text = s.span.context[where[0]:where[1]]
            em, f1 = em + spans.exact_match(text, s.span.answers), f1 + spans.token_f1(text, s.span.answers)
    assert got["eval/exact_match"] == pytest.approx(em / len(splits.eval))
    assert got["eval/f1"] == pytest.approx(f1 / len(splits.eval))


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("task, sections, message", [
    ("token_classification", {"data": {"packing": True}}, "data.packing: a token_classification head reads one"),
    ("question_answering", {"eval": {"choices": ["a", "b"]}}, "eval.choices: a question_answering model is scored"),
    ("question_answering", {"data": {"format": "alpaca"}}, "data.format: a question_answering head reads its own"),
    ("token_classification", {"method": {"name": "distill", "teacher": {"path": "."}, "signal": "cached",
                                          "cache_dir": "c"}}, "method.name: 'distill' needs a teacher signal"),
])
def test_refused_combinations(tiny_encoder, ner_file, tmp_path, task, sections, message):
    base = {"model": {"task": task}, "data": {"columns": NER_COLUMNS}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    cfg = load_config(tiny.base_config(tiny_encoder, ner_file, tmp_path, **base))
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_validate_names_the_bad_line(tiny_encoder, tmp_path):
    rows = tiny.qa_rows(12)
    rows[9]["answers"]["answer_start"] = [0]
    path = tiny.write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = load_config(tiny.base_config(tiny_encoder, path, tmp_path, model={"task": "question_answering"},
                                       data={"eval_size": 2}))
    with pytest.raises(DataError, match=r"qa.jsonl line 10: answer '.*' is not at answer_start 0"):
        validate(cfg)


def test_a_tagging_mixture_takes_every_tasks_tags(enc_tok, tmp_path):
    pos_only = [r for r in tiny.ner_rows(40, seed=1) if all("NEG" not in t for t in r["ner"])]
    a = tiny.write_jsonl(tmp_path / "a.jsonl", pos_only)
    b = tiny.write_jsonl(tmp_path / "b.jsonl", tiny.ner_rows(20, seed=2))
    data = DataSection(columns=NER_COLUMNS, eval_size=2, tasks=[{"name": "a", "path": str(a)},
                                                                {"name": "b", "path": str(b)}])
    splits = load_splits(data, enc_tok, 0, task="token_classification")
    assert "B-NEG" not in {t for r in pos_only for t in r["ner"]} and splits.labels == TAGS
    assert {s.task for s in splits.train} == {"a", "b"} and splits.stats["tags"] == 5


def test_plan_shows_tags_and_answer_spans(tiny_encoder, ner_file, qa_file, tmp_path):
    from distune.plan import show_samples

    cfg = load_config(tiny.base_config(tiny_encoder, ner_file, tmp_path, model={"task": "token_classification"},
                                       data={"columns": NER_COLUMNS}))
    shown = show_samples(cfg, {"model_source": str(tiny_encoder)}, 1)
    assert "/O" in shown or "/B-" in shown
    cfg = load_config(tiny.base_config(tiny_encoder, qa_file, tmp_path, model={"task": "question_answering"}))
    shown = show_samples(cfg, {"model_source": str(tiny_encoder)}, 1)
    assert "«" in shown and ("[CLS] good [SEP]" in shown or "[CLS] bad [SEP]" in shown)


@pytest.mark.parametrize("head", ["token_classification", "question_answering"])
def test_prompt_learning_outputs_for_virtual_tokens_are_dropped(world_of_one, enc_tok, tiny_encoder, ner_file,
                                                                qa_file, head):
    """PEFT prompt / p-tuning prepend virtual tokens: the method's outputs, loss and eval are the input's own
    tokens' (models.align_virtual_tokens cuts the virtual positions off)."""
    data = DataSection(path=str(ner_file if head == "token_classification" else qa_file), eval_size=4,
                       columns=NER_COLUMNS if head == "token_classification" else {})
    splits = load_splits(data, enc_tok, 0, task=head)
    base = load_model(str(tiny_encoder), labels=splits.labels, task=head).eval()
    method = build_method("prompt_tuning", {"num_virtual_tokens": 3})
    model = method.adapt(base).eval()
    batch = collate(splits.train[:2], enc_tok.pad_token_id)
    loss = method.loss(model, batch, {}).loss
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              **({"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {})}
    with torch.no_grad():
        aligned = model(**inputs)
        model._distune_aligned.remove()
        raw = model(**inputs)  # what PEFT returns: virtual positions first
    width = batch["input_ids"].shape[1]
    keys = ["logits"] if head == "token_classification" else ["start_logits", "end_logits"]
    for key in keys:
        assert raw[key].shape[1] == width + 3 and torch.equal(aligned[key], raw[key][:, 3:])
    if head == "token_classification":
        tagged = batch["tag_labels"] != -100
        hand = torch.nn.functional.cross_entropy(raw.logits[:, 3:][tagged], batch["tag_labels"][tagged])
    else:
        ce = torch.nn.functional.cross_entropy
        hand = (ce(raw.start_logits[:, 3:], batch["start_positions"])
                + ce(raw.end_logits[:, 3:], batch["end_positions"])) / 2
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)


def test_tag_ids_are_names_from_data_labels(enc_tok, tmp_path):
    rows = [{"words": r["words"], "ner": [TAGS.index(t) for t in r["ner"]]} for r in tiny.ner_rows(10)]
    path = tiny.write_jsonl(tmp_path / "ids.jsonl", rows)
    named = tiny.write_jsonl(tmp_path / "names.jsonl", tiny.ner_rows(10))
    cfg = {"columns": NER_COLUMNS, "eval_size": 2, "labels": TAGS}
    by_id = load_splits(DataSection(path=str(path), **cfg), enc_tok, 0, task="token_classification")
    by_name = load_splits(DataSection(path=str(named), **cfg), enc_tok, 0, task="token_classification")
    assert [s.tags for s in by_id.train] == [s.tags for s in by_name.train]
    rows[3]["ner"][0] = 7
    tiny.write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"line 4: tag ids .* do not all index data.labels \(5 names\)"):
        load_splits(DataSection(path=str(path), **cfg), enc_tok, 0, task="token_classification")
