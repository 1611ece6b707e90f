"""Token statistics of rendered examples for `chattune data stats`: lengths, labelled tokens, a histogram
(text and PNG). Pure functions of `Example` dicts.
"""

from __future__ import annotations

from pathlib import Path


# -- length statistics ------------------------------------------------------------------------------------
def _lengths(examples: list[dict]) -> dict[str, list[int]]:
    answer = [sum(label != -100 for label in e["labels"]) for e in examples]
    total = [len(e["input_ids"]) for e in examples]
    return {"prompt": [t - a for t, a in zip(total, answer, strict=True)], "answer": answer, "total": total}


def _nearest_rank(sorted_values: list[int], q: int) -> int:
    n = len(sorted_values)
    return sorted_values[min(n - 1, max(0, -(-n * q // 100) - 1))]


def length_table(examples: list[dict]) -> dict[str, dict[str, float]]:
    """mean, p50, p90 and max of the prompt (untrained), answer (trained) and total tokens per example."""
    table = {}
    for name, values in _lengths(examples).items():
        v = sorted(values) or [0]
        table[name] = {
            "mean": sum(v) / len(v),
            "p50": _nearest_rank(v, 50),
            "p90": _nearest_rank(v, 90),
            "max": v[-1],
        }
    return table


def histogram(values: list[int], bins: int = 12) -> list[tuple[int, int, int]]:
    """(low, high, count) bins of a round width covering the values."""
    top = max(values or [1])
    width = next(w * 10**e for e in range(10) for w in (1, 2, 5) if w * 10**e * bins >= top)
    counts = [0] * (top // width + 1)
    for x in values:
        counts[x // width] += 1
    return [(k * width, (k + 1) * width - 1, n) for k, n in enumerate(counts)]


def format_stats(table: dict, examples: list[dict], max_len: int, *, title: str) -> str:
    lines = [f"{title}:{'mean':>10}{'p50':>8}{'p90':>8}{'max':>8}"]
    for name, row in table.items():
        lines.append(
            f"  {name:<{len(title) - 1}}{row['mean']:>10.1f}{row['p50']:>8}{row['p90']:>8}{row['max']:>8}"
        )
    bins = histogram(_lengths(examples)["total"])
    peak = max((n for _, _, n in bins), default=1) or 1
    lines.append(f"total tokens per example ('>' marks bins past data.max_len {max_len}):")
    for lo, hi, n in bins:
        mark = ">" if hi >= max_len else " "
        lines.append(f" {mark}{lo:>7}-{hi:<7}{'█' * round(40 * n / peak):<40} {n}")
    return "\n".join(lines)


def write_histogram_png(examples: list[dict], max_len: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = _lengths(examples)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist([lengths["total"], lengths["answer"]], bins=40, label=["total", "answer (trained)"], alpha=0.8)
    ax.axvline(max_len, color="red", linestyle="--", label=f"data.max_len = {max_len}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
