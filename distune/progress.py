"""The user's terminal: a progress bar (step, loss, tokens/s, ETA) and eval lines, from worker events.

Used by the driver under Ray (events arrive through an actor) and by rank 0 without Ray.
"""

from __future__ import annotations

from tqdm import tqdm


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


class ProgressPrinter:
    """With `bar=False` (logs, CI, --no-progress) each logged step is a plain line instead of a bar."""

    def __init__(self, bar: bool = True):
        self.bar: tqdm | None = None
        self.use_bar = bar
        self.total = None

    def handle(self, event: dict) -> None:
        kind = event.get("kind")
        if not self.use_bar and kind in ("start", "step"):
            if kind == "start":
                self.total = event["total_steps"]
                print(f"training: step {event['step']} -> {self.total}", flush=True)
            else:
                print(f"step {event['step']}/{self.total}  loss={event['loss']:.4f}  "
                      f"tok_s={event['tokens_per_s']:.0f}", flush=True)
            return
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
