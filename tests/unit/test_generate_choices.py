"""`generate --choices` (a teacher labelling a transfer set): only responses that are one of the choices are kept,
compared without surrounding spaces; the others are counted. Runs the shard function in-process on the tiny model."""

from distune.generate import generate_shard
from distune.models import load_tokenizer


def settings(tiny_model, choices):
    return {"source": str(tiny_model), "dtype": "fp32", "trust_remote_code": False, "layers": None,
            "max_new_tokens": 2, "temperature": 0.0, "top_p": 1.0, "num_samples": 1, "batch_size": 4,
            "seed": 0, "rationale": False, "cpus": 1, "choices": choices}


def test_only_responses_among_the_choices_are_kept(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    items = [(i, {"text": t}, tok(f"Sentiment: {t}")["input_ids"])
             for i, t in enumerate(["great day", "awful food", "the movie", "so sad", "fun trip", "it was"])]
    free = generate_shard(settings(tiny_model, None), items, 0, 1)
    texts = [row["response"] for _, row in free["rows"]]
    assert len(texts) + free["empty"] == len(items) and texts
    picked = texts[0]
    kept = generate_shard(settings(tiny_model, [f"  {picked} "]), items, 0, 1)
    assert [row["response"] for _, row in kept["rows"]] == [t for t in texts if t == picked]
    assert kept["unparsed"] == len(texts) - len(kept["rows"])
