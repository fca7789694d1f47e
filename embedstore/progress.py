"""The one progress helper: a rich bar on stderr with a rate column, or a no-op (library use, --json).

    with progress_bar(len(items), "embedding (cpu)", enabled) as advance:
        advance(n)                       # n more items done
        advance(n, loss=0.3, epoch=2)    # and update the extra fields shown after the rate

Extra `fields` (name -> format, e.g. {"loss": "loss {:.3f}"}) are shown after the count and can be
updated through `advance`'s keyword arguments.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
Advance = Callable[..., None]


def _noop(n: int = 0, **fields) -> None:
    return None


@contextmanager
def progress_bar(
    total: int,
    label: str,
    enabled: bool = True,
    *,
    unit: str = "img",
    min_total: int = 1,
    fields: dict[str, str] | None = None,
) -> Iterator[Advance]:
    """Yield advance(n, **fields); a no-op when disabled or when total < min_total (too short to watch)."""
    if not enabled or total < max(1, min_total):
        yield _noop
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.1f} {unit}/s" if speed else "", style="cyan")

    fields = dict(fields or {})

    class Fields(ProgressColumn):
        def render(self, task):
            vals = task.fields
            parts = [fmt.format(vals[k]) for k, fmt in fields.items() if vals.get(k) is not None]
            return Text("  ".join(parts))

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), Rate()]
    if fields:
        columns.append(Fields())
    columns.append(TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as p:
        task = p.add_task(label, total=total, **{k: None for k in fields})

        def advance(n: int = 0, **values) -> None:
            p.update(task, advance=n, **values)

        yield advance


def progress_iter(items: Sequence[T], label: str, enabled: bool = True, *, unit: str = "img", min_total: int = 200) -> Iterable[T]:
    """Iterate `items` with a bar (when enabled and there are at least `min_total` of them)."""
    with progress_bar(len(items), label, enabled, unit=unit, min_total=min_total) as advance:
        for x in items:
            yield x
            advance(1)
