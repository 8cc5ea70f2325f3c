"""PNG plots drawn with Pillow (matplotlib is not a dependency): the learning-rate schedule and the
example-length histogram at plan time, the loss curves at the end of a run."""

from __future__ import annotations

import math
from distsft import rundir
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont


SIZE = (960, 560)
MARGIN = {"left": 100, "right": 30, "top": 56, "bottom": 72}
BLUE, ORANGE, RED, GREY, GRID, BLACK = "#1f77b4", "#ff7f0e", "#d62728", "#7f7f7f", "#e6e6e6", "#202020"


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed-size bitmap font still reads
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, target: int = 6) -> tuple[list[float], float]:
    """Round tick values (1, 2, 2.5 or 5 × 10^k apart) within [lo, hi], about `target` of them."""
    span = hi - lo
    mag = 10 ** math.floor(math.log10(span / max(target - 1, 1)))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10)), key=lambda st: abs(span / st + 1 - target))
    first = math.ceil(lo / step - 1e-9) * step
    ticks = [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks], step


def _decimals(x: float) -> int:
    return next(d for d in range(12) if abs(round(x, d) - x) <= 1e-9 * abs(x))


def fmt_tick(value: float, step: float) -> str:
    """As many decimals as the tick spacing needs; scientific for learning-rate-sized numbers."""
    if value == 0:
        return "0"
    if step < 1e-3 or abs(value) >= 1e6:
        # One decimal more than the spacing's mantissa, so 5.0e-06 and 1.5e-05 line up.
        exp_s = math.floor(math.log10(step))
        return f"{value:.{1 + _decimals(step / 10 ** exp_s)}e}"
    return f"{value:.{_decimals(step)}f}"


def _padded(lo: float, hi: float, pad: float = 0.05) -> tuple[float, float]:
    if hi <= lo:
        d = abs(lo) * 0.1 or 1.0
        return lo - d, hi + d
    return lo - (hi - lo) * pad, hi + (hi - lo) * pad


class Chart:
    """One x/y plot: grid, numbered ticks, title, axis labels, legend."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xlim: tuple[float, float],
                 ylim: tuple[float, float], size: tuple[int, int] = SIZE):
        self.img = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.img)
        self.x0, self.y0 = MARGIN["left"], MARGIN["top"]
        self.x1, self.y1 = size[0] - MARGIN["right"], size[1] - MARGIN["bottom"]
        self.xlim = xlim if xlim[1] > xlim[0] else _padded(*xlim)
        self.ylim = ylim if ylim[1] > ylim[0] else _padded(*ylim)
        self.legend: list[tuple[str, str]] = []
        self.small, self.font, self.big = _font(13), _font(15), _font(18)
        self._axes(title, xlabel, ylabel)

    def px(self, x: float, y: float) -> tuple[float, float]:
        (xa, xb), (ya, yb) = self.xlim, self.ylim
        return (self.x0 + (x - xa) / (xb - xa) * (self.x1 - self.x0),
                self.y1 - (y - ya) / (yb - ya) * (self.y1 - self.y0))

    def _axes(self, title: str, xlabel: str, ylabel: str) -> None:
        d = self.draw
        xticks, xstep = nice_ticks(*self.xlim, target=8)
        yticks, ystep = nice_ticks(*self.ylim)
        for t in xticks:
            x, _ = self.px(t, self.ylim[0])
            d.line([(x, self.y0), (x, self.y1)], fill=GRID)
            d.line([(x, self.y1), (x, self.y1 + 5)], fill=BLACK)
            d.text((x, self.y1 + 8), fmt_tick(t, xstep), fill=BLACK, font=self.small, anchor="mt")
        for t in yticks:
            _, y = self.px(self.xlim[0], t)
            d.line([(self.x0, y), (self.x1, y)], fill=GRID)
            d.line([(self.x0 - 5, y), (self.x0, y)], fill=BLACK)
            d.text((self.x0 - 8, y), fmt_tick(t, ystep), fill=BLACK, font=self.small, anchor="rm")
        d.rectangle([self.x0, self.y0, self.x1, self.y1], outline=BLACK)
        d.text(((self.x0 + self.x1) / 2, 16), title, fill=BLACK, font=self.big, anchor="mt")
        d.text(((self.x0 + self.x1) / 2, self.img.height - 12), xlabel, fill=BLACK, font=self.font, anchor="mb")
        # Pillow draws no vertical text: render the y label flat, then rotate it into place.
        box = self.draw.textbbox((0, 0), ylabel, font=self.font)
        label = Image.new("RGBA", (box[2] + 4, box[3] + 4), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((2, 2), ylabel, fill=BLACK, font=self.font)
        label = label.rotate(90, expand=True)
        self.img.paste(label, (10, int((self.y0 + self.y1 - label.height) / 2)), label)

    def _clip(self, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(min(max(x, self.x0), self.x1), min(max(y, self.y0), self.y1)) for x, y in points]

    def line(self, xs: Sequence[float], ys: Sequence[float], color: str, label: str, markers: bool = False) -> None:
        pts = self._clip([self.px(x, y) for x, y in zip(xs, ys)])
        stride = len(pts) // (2 * (self.x1 - self.x0)) + 1  # ~2 points per pixel column are enough
        pts = pts[::stride] + pts[-1:] if stride > 1 else pts
        if len(pts) > 1:
            self.draw.line(pts, fill=color, width=2, joint="curve")
        if markers or len(pts) == 1:
            for x, y in pts:
                self.draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        self.legend.append((label, color))

    def bars(self, edges: Sequence[float], counts: Sequence[float], color: str, label: str) -> None:
        for lo, hi, c in zip(edges, edges[1:], counts):
            if c > 0:
                (xa, ya), (xb, yb) = self._clip([self.px(lo, c), self.px(hi, self.ylim[0])])
                self.draw.rectangle([xa, ya, max(xa, xb - 1), yb], fill=color)
        self.legend.append((label, color))

    def vline(self, x: float, color: str, label: str) -> None:
        px, _ = self.px(x, self.ylim[0])
        if self.x0 <= px <= self.x1:
            for y in range(self.y0, self.y1, 12):  # dashed, so it reads as a marker, not data
                self.draw.line([(px, y), (px, min(y + 7, self.y1))], fill=color, width=2)
            self.legend.append((label, color))

    def save(self, path: Path) -> Path:
        if self.legend:
            w = max(self.draw.textlength(t, font=self.font) for t, _ in self.legend) + 44
            h = 22 * len(self.legend) + 8
            x, y = self.x1 - w - 10, self.y0 + 10
            self.draw.rectangle([x, y, x + w, y + h], fill="white", outline=GREY)
            for i, (text, color) in enumerate(self.legend):
                cy = y + 15 + 22 * i
                self.draw.line([(x + 8, cy), (x + 30, cy)], fill=color, width=4)
                self.draw.text((x + 36, cy), text, fill=BLACK, font=self.font, anchor="lm")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.img.save(path, format="PNG")
        return path


def lr_schedule(spec: Any, total_steps: int, warmup_steps: int) -> list[float]:
    """The learning rate of each optimizer step 1..total_steps, from the scheduler training builds."""
    from distsft.config.schedules import lr_curve
    return lr_curve(spec, total_steps, warmup_steps)


def lr_schedule_png(spec: Any, total_steps: int, warmup_steps: int, path: Path) -> Path:
    lrs = lr_schedule(spec, total_steps, warmup_steps)
    steps = list(range(1, total_steps + 1))
    from distsft.config.schedules import final_lr_note
    chart = Chart(f"Learning rate: {spec.train.lr_scheduler_type}, peak {spec.train.learning_rate:g}"
                  f"{final_lr_note(spec.train)}, {total_steps} steps", "optimizer step", "learning rate",
                  (0, max(total_steps, 1)), (0, max(lrs) * 1.08 if lrs and max(lrs) > 0 else 1.0))
    chart.line(steps, lrs, BLUE, "learning rate", markers=total_steps <= 30)
    if warmup_steps:
        chart.vline(warmup_steps, GREY, f"warmup: steps 1-{warmup_steps}")
    return chart.save(Path(path))


def _histogram(stats: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Bin edges and counts from the build's `length_histogram` ({"bin_edges", "counts"}), tolerating an
    `edges` key or left edges only."""
    h = stats.get("length_histogram") or {}
    counts = [float(c) for c in h.get("counts", [])]
    edges = [float(e) for e in h.get("bin_edges", h.get("edges", []))]
    if counts and len(edges) == len(counts):
        width = edges[1] - edges[0] if len(edges) > 1 else 1.0
        edges.append(edges[-1] + width)
    if not counts or len(edges) != len(counts) + 1:
        return [], []
    return edges, counts


def length_histogram_png(stats: dict[str, Any], max_length: int, path: Path) -> Path | None:
    edges, counts = _histogram(stats)
    if not counts:
        return None
    n = int(sum(counts))
    chart = Chart(f"Example lengths: {n:,} examples", "tokens per example", "examples",
                  (min(0.0, edges[0]), max(edges[-1], max_length) * 1.04), (0, max(counts) * 1.1 or 1.0))
    chart.bars(edges, counts, BLUE, "examples per length bin")
    chart.vline(max_length, RED, f"data.max_length = {max_length}")
    return chart.save(Path(path))


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    # metrics.jsonl stores NaN/inf as strings; they are left out of the curve (the run stops on them).
    pts = [(float(r["step"]), float(r[key])) for r in records
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def loss_curves_png(records: list[dict[str, Any]], path: Path) -> Path | None:
    (tx, ty), (ex, ey) = _series(records, "loss"), _series(records, "eval_loss")
    if not tx and not ex:
        return None
    xs, ys = tx + ex, ty + ey
    chart = Chart("Loss", "optimizer step", "loss (per target token)", (0, max(xs)), _padded(min(ys), max(ys)))
    if tx:
        chart.line(tx, ty, BLUE, "train loss")
    if ex:
        chart.line(ex, ey, ORANGE, "eval loss", markers=True)
    return chart.save(Path(path))


def plan_plots(spec: Any, total_steps: int | None, warmup_steps: int | None,
               stats: dict[str, Any] | None) -> list[Path]:
    """`lr_schedule.png` (when the step count is known) and `length_histogram.png` (when the data was
    read) in the output directory, next to run.yaml."""
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path | None] = []
    if total_steps:
        written.append(lr_schedule_png(spec, total_steps, warmup_steps or 0, out / rundir.LR_SCHEDULE_PNG))
    if stats:
        written.append(length_histogram_png(stats, spec.data.max_length, out / rundir.LENGTH_HISTOGRAM_PNG))
    return [p for p in written if p is not None]


def run_end_plots(output_dir: str | Path, records: list[dict[str, Any]]) -> list[Path]:
    path = loss_curves_png(records, Path(output_dir) / rundir.LOSS_CURVES_PNG)
    return [path] if path else []
