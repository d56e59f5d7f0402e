"""What the trainer reports: a line per logged step, the closing summary, a progress bar, and logging to
stdout where the program has not set logging up."""

from __future__ import annotations

import logging
import math
import sys

from .config import TrainConfig

logger = logging.getLogger("pipetrain")


def format_record(r: dict) -> str:
    extra = f" | held-out {r['eval_loss']:.4f}" if r.get("eval_loss") is not None else ""
    mfu = f" | MFU {r['mfu']:.1%}" if "mfu" in r else ""
    aux = f" | aux {r['aux_loss']:.4f}" if "aux_loss" in r else ""
    return (f"step {r['step']:5d} | loss {r['loss']:.4f}{aux} | lr {r['lr']:.2e} | grad norm {r['grad_norm']:.3f} | "
            f"{r['tokens_per_s']:7.0f} tokens/s{mfu} | idle {' '.join(f'{b:.0%}' for b in r['bubble_per_rank'])}"
            f"{extra}")


def summary_lines(history: list[dict], final: float | None, seconds: float, layout: str, skipped: int) -> list[str]:
    """The closing summary; `final` is the held-out loss (None without held-out data)."""
    if not history:
        return []
    k = min(10, len(history))
    first = sum(r["loss"] for r in history[:k]) / k
    last = sum(r["loss"] for r in history[-k:]) / k
    tokens = sum(r["tokens_per_s"] * r["step_time"] for r in history)
    world = len(history[0]["bubble_per_rank"])
    bubbles = [sum(r["bubble_per_rank"][i] for r in history) / len(history) for i in range(world)]
    mfu = (f", MFU {sum(r['mfu'] for r in history) / len(history):.1%} of measured matmul peak"
           if "mfu" in history[0] else "")
    held_out = f"; held-out loss {final:.4f} (perplexity {perplexity(final)})" if final is not None else ""
    lines = [f"\nsummary: {len(history)} steps in {seconds:.1f}s on {layout}, {tokens / seconds:.0f} tokens/s{mfu}",
             f"  train loss (mean of {k} steps) {first:.4f} -> {last:.4f}{held_out}",
             f"  idle (bubble) per rank {' '.join(f'{b:.1%}' for b in bubbles)}; peak memory per rank "
             f"{' '.join(f'{m / 2**20:.0f}MiB' for m in history[-1]['peak_memory_per_rank'])}"]
    if skipped:
        lines.append(f"  {skipped} step(s) skipped: non-finite loss or gradients (on_nonfinite='skip')")
    return lines


def perplexity(loss: float) -> str:
    return f"{math.exp(loss):.2f}" if loss < 50 else "inf"


def progress_bar(cfg: TrainConfig, initial: int):
    """A tqdm bar when asked (or stdout is a terminal) and tqdm is installed; None for plain lines."""
    wanted = cfg.progress if cfg.progress is not None else sys.stdout.isatty()
    if not wanted:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=initial, unit="step", dynamic_ncols=True)


def tqdm_logging():
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[logger])


def ensure_log_handler() -> None:
    """Where the program has not configured logging, pipetrain's messages go to stdout (as lines)."""
    if not logger.handlers and not logging.getLogger().handlers:
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a message comes (a log-file tee, a test's capture)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def layout(pipe) -> str:
    """How a pipeline's ranks are laid out, e.g. "4 ranks", "dp 2 x pp 2 ranks", "pp 2 x tp 2 ranks", "dp 2 (ep 2)
    x pp 2 ranks" (the ep ranks are data-parallel replicas)."""
    ep = getattr(pipe, "ep_size", 1)
    sizes = ((f"dp {pipe.dp_size} (ep {ep})" if ep > 1 else "dp", pipe.dp_size), ("pp", pipe.world_size),
             ("tp", pipe.tp_size))
    dims = [name if name.startswith("dp ") else f"{name} {size}" for name, size in sizes if size > 1 or name == "pp"]
    return f"{' x '.join(dims)} ranks" if len(dims) > 1 else f"{pipe.world_size} ranks"
