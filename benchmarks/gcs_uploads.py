r"""What a short training run uploads to gs://, counted at the loopback GCS emulator.

    python -m benchmarks.gcs_uploads                 # 20 steps, a log line per step
    python -m benchmarks.gcs_uploads --steps 50

Runs ``train.py`` on ``tests/tiny_config.py`` with a ``gs://`` workdir served by the
test emulator (``tests/gcs``, needs requirements-test.txt) and counts the uploads the
server received, by kind of object: the TensorBoard events file, checkpoint objects,
everything else. The events row is the one that matters on a pod: clu's writer used to
flush (re-upload the whole events file) on every write; the trainer now queues events
and flushes at intervals, a stop and the end (``trainer.progress.QueuedSummaryWriter``).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests import helpers  # noqa: E402
from tests.gcs import GcsServer  # noqa: E402


def _kind(name: str) -> str:
    if "tfevents" in name:
        return "events"
    if "/checkpoints/" in name:
        return "checkpoints"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    server = GcsServer(pathlib.Path(tempfile.mkdtemp()))
    try:
        workdir = server.prefix("uploads")
        server.clear_requests()
        config = f"tests/tiny_config.py:steps={args.steps},checkpoint_every=1000"
        command = ["train.py", "--config", config, "--workdir", workdir]
        process = helpers.Process(command, helpers.environment(1, **server.env))
        if process.finish(600) != 0:
            sys.exit(f"train.py failed:\n{process.output}")
        count, size = collections.Counter(), collections.Counter()
        for kind, name, nbytes in (r[:3] for r in server.requests()):
            if kind == "UPLOAD":
                count[_kind(name)] += 1
                size[_kind(name)] += nbytes
        print(f"{args.steps} steps, {config}")
        print(f"{'object':<12} {'uploads':>8} {'bytes':>10}")
        for kind in ("events", "checkpoints", "other"):
            print(f"{kind:<12} {count[kind]:>8} {size[kind]:>10,}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
