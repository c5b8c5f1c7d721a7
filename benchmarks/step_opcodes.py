"""Python opcodes the engine runs per sequence per decode step, with the model stubbed (the setup of
`cupaged bench overhead`): a deterministic measure of the host side's Python work, where wall time on
a shared host moves 2x between runs. Prints the total per sequence and the top functions.

    python benchmarks/step_opcodes.py 256 20
"""
from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

from cupaged.cli.bench_overhead import fill, make_engine, stub_model_dir


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    with tempfile.TemporaryDirectory() as tmp:
        engine, stream = make_engine(stub_model_dir(Path(tmp)), n)
        fill(engine, stream, n)
        for _ in range(5):
            engine.step()
        count: collections.Counter = collections.Counter()

        def tracer(frame, event, arg):
            frame.f_trace_opcodes = True
            if event == "opcode":
                count[f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"] += 1
            return tracer

        sys.settrace(tracer)
        for _ in range(5):
            engine.step()
        sys.settrace(None)
    total = sum(count.values())
    print(f"{n} decodes: {total / 5:.0f} opcodes per step, {total / 5 / n:.1f} per sequence")
    for name, v in count.most_common(top):
        print(f"{v / 5 / n:8.1f}  {name}")


if __name__ == "__main__":
    main()
