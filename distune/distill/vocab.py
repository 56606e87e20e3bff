"""Teacher/student vocabulary alignment, decided before any worker starts.

Token-level distillation compares distributions over the same token ids, so the tokenizers must agree.
What often differs is only the embedding matrix: models pad it to a multiple of 64 or 128 for speed
(Qwen2: 151,665 tokens, 151,936 rows; a sibling 152,064), and the padded rows are ids no tokenizer
produces. Those rows are cut off both sides (`aligned_vocab_size`), automatically. Anything else is an
error that points to sequence-level distillation, which needs no shared vocabulary.
"""

from __future__ import annotations

import hashlib
import json


class VocabMismatch(ValueError):
    pass


def vocab_fingerprint(tokenizer) -> str:
    """Hash of the token -> id map (specials included): equal fingerprints mean the same tokenization ids."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def aligned_vocab_size(student_tok, teacher_tok, student_rows: int, teacher_rows: int) -> int:
    """The number of leading logit columns both models share, or VocabMismatch with what to do instead.

    `*_rows` are the output-embedding sizes (config.vocab_size); the tokenizers must be identical.
    """
    n_student, n_teacher = len(student_tok), len(teacher_tok)
    if n_student != n_teacher or vocab_fingerprint(student_tok) != vocab_fingerprint(teacher_tok):
        s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
        differ = next((tok for tok, i in sorted(t_vocab.items(), key=lambda kv: kv[1]) if s_vocab.get(tok) != i),
                      None)
        where = f"; first differing token: {differ!r}" if differ is not None else ""
        raise VocabMismatch(
            f"teacher and student tokenizers differ ({n_teacher} vs {n_student} tokens{where}): token-level "
            "distillation needs one vocabulary. Use sequence-level distillation instead: `distune generate` "
            "has the teacher write responses, then fine-tune the student on them")
    for who, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows < n_student:
            raise VocabMismatch(f"the {who} model has {rows} output rows but its tokenizer {n_student} tokens")
    return n_student
