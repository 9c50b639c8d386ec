"""tqdm bars on stderr: experiments done, and configurations done (quiet when stderr is not a
terminal or with --quiet)."""

from __future__ import annotations

import sys


class Bars:
    def __init__(self, specs, done=(), quiet: bool = False):
        self.left: dict[str, int] = {}
        for s in specs:
            self.left[s["experiment"]] = self.left.get(s["experiment"], 0) + 1
        for s in done:
            self.left[s["experiment"]] -= 1
        self.failed = 0
        self.on = not quiet and sys.stderr.isatty()
        if not self.on:
            return
        from tqdm import tqdm

        finished = sum(1 for n in self.left.values() if n == 0)
        self.exp = tqdm(
            total=len(self.left),
            initial=finished,
            desc="experiments",
            unit="exp",
            file=sys.stderr,
            position=0,
            leave=True,
        )
        self.cfg = tqdm(
            total=len(specs),
            initial=len(list(done)),
            desc="configurations",
            unit="cfg",
            file=sys.stderr,
            position=1,
            leave=True,
        )

    def done(self, spec, ok: bool) -> None:
        name = spec["experiment"]
        self.left[name] -= 1
        self.failed += not ok
        if not self.on:
            return
        self.cfg.update(1)
        self.cfg.set_postfix_str(
            f"{spec['task_key']}" + (f", {self.failed} failed" if self.failed else "")
        )
        if self.left[name] == 0:
            self.exp.update(1)
            self.exp.set_postfix_str(f"{name} done")

    def close(self) -> None:
        if self.on:
            self.cfg.close()
            self.exp.close()
