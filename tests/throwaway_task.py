"""Install a throwaway third-party task the way pip would: a module plus a .dist-info folder that declares it in
the `distune.tasks` entry-point group, in a folder put on the path. The task is score regression: a number per
text, a one-output head trained by mean squared error."""

from __future__ import annotations

import textwrap
from pathlib import Path

from throwaway_plugin import install_distribution

SOURCE = textwrap.dedent('''
    """score regression: a number per text (a third-party distune task)."""
    from dataclasses import dataclass
    from typing import ClassVar

    import torch
    import torch.distributed as dist

    from distune.errors import DataError
    from distune.tasks import Batch, LossOutput, Task, model_inputs
    from distune.tasks.base import forward, padded


    @dataclass
    class ScoreSample:
        kind: ClassVar[str] = "score_regression"
        input_ids: list
        line: int
        target: float
        extras: dict | None = None
        task: str | None = None


    class ScoreRegression(Task):
        head = "AutoModelForSequenceClassification"

        def head_options(self, labels):
            return {"num_labels": 1, "problem_type": "regression"}

        def render(self, renderer, line, row, canonical, labels):
            row = renderer.normalise(line, row)
            text = renderer.prompt_text(line, row, canonical, normalised=True)
            try:
                target = float(renderer.fill(renderer.cfg.response, row, line, "data.response"))
            except ValueError:
                raise DataError(f"{renderer.source.at(line)}: the response is not a number") from None
            ids = renderer.tok(text, truncation=True, max_length=renderer.cfg.max_length)["input_ids"]
            return ScoreSample(ids, line, target)

        def collate(self, samples, pad_id):
            return Batch(self, padded(samples, pad_id) | {"scores": torch.tensor([s.target for s in samples])})

        def loss(self, model, batch, loss_chunk=None):
            out = model(**model_inputs(batch)).logits.squeeze(-1).float()
            loss = torch.nn.functional.mse_loss(out, batch["scores"].float())
            return LossOutput(loss, {"mse": loss.detach()})

        def evaluate(self, model, shard, micro_batch, pad_id, device, options):
            totals = torch.zeros(2, dtype=torch.float64, device=device)  # [squared error, counted]
            for start in range(0, len(shard), micro_batch):
                out, batch, weights = forward(model, shard[start:start + micro_batch], self, pad_id, device)
                error = (out.logits.squeeze(-1).double() - batch["scores"].double()) ** 2
                totals += torch.stack([(error * weights).sum(), weights.sum()])
            dist.all_reduce(totals)
            return {"eval/loss": (totals[0] / totals[1]).item(), "eval/mse": (totals[0] / totals[1]).item()}
''')


def install(site: Path) -> Path:
    return install_distribution(site, "throwaway_score_task", SOURCE, "distune.tasks", "score_regression",
                                "ScoreRegression")
