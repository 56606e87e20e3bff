"""The user's terminal: a progress bar (step, loss, tokens/s, ETA) and eval lines, from worker events.

Used by the driver under Ray (events arrive through an actor) and by rank 0 without Ray.
"""

from __future__ import annotations

from tqdm import tqdm


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


class ProgressPrinter:
    def __init__(self):
        self.bar: tqdm | None = None

    def handle(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "start":
            self.bar = tqdm(total=event["total_steps"], initial=event["step"], desc="train", unit="step",
                            dynamic_ncols=True)
        elif kind == "step" and self.bar is not None:
            self.bar.update(event["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{event['loss']:.4f}", tok_s=f"{event['tokens_per_s']:.0f}",
                                 refresh=False)
        elif kind in ("eval", "info", "done"):
            if kind == "done":
                self.close()
            text = event.get("text") or f"[{kind} @ step {event.get('step')}] {format_metrics(event['metrics'])}"
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
