"""Read a py-spy collapsed-stack file (bench.run --profile): where the target's CPU went, as text.

    .venv/bin/python -m bench.flames FILE [--top 25] [--match server/]

Prints the frames with the most samples on top of the stack (self) and in the stack at all (inclusive),
as shares of all samples. Frames are "function (file:line)" as py-spy writes them; lines are dropped so a
function counts once.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def frame_name(frame: str) -> str:
    """'send (uvicorn/protocols/websockets/x.py:123)' -> 'send (uvicorn/protocols/websockets/x.py)'."""
    return _LINE.sub(")", frame.strip())


def tally(lines: list[str]) -> tuple[int, Counter[str], Counter[str]]:
    """(all samples, samples per frame on top, samples per frame anywhere in the stack)."""
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in lines:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";") if f]
        total += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return total, own, inclusive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flames", description=__doc__.split("\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="inclusive list: only frames whose text contains this")
    args = parser.parse_args(argv)
    total, own, inclusive = tally(args.file.read_text(errors="replace").splitlines())
    if not total:
        print("no samples")
        return 1
    print(f"{total} samples\n\nself:")
    for frame, count in own.most_common(args.top):
        print(f"  {100 * count / total:5.1f}%  {frame}")
    print("\ninclusive:")
    shown = [(f, c) for f, c in inclusive.most_common() if args.match in f][:args.top]
    for frame, count in shown:
        print(f"  {100 * count / total:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
