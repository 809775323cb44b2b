"""Real train.py processes for the fault tests: started, watched line by line, signalled."""

from __future__ import annotations

import os
import pathlib
import queue
import re
import subprocess
import sys
import threading
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def environment(devices: int = 1, **extra: str) -> dict[str, str]:
    """The test's environment with ``devices`` fake CPU devices and the tests' compilation
    cache (so that each process compiles the tiny model's step once per suite)."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


class Process:
    """A subprocess whose merged stdout/stderr is collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.popen.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        """Blocks until a line matches ``pattern``; fails with the output so far if the
        process ends or the time runs out first."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if match := re.search(pattern, line):
                return match
        self.popen.kill()
        raise AssertionError(f"no line matching {pattern!r} in:\n{self.output}")

    def finish(self, timeout: float = 180) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.output}") from None
        time.sleep(0.05)  # let the reader thread drain the pipe
        return code


def train(workdir, config_arg: str, *flags: str, devices: int = 1, **env: str) -> Process:
    """``python train.py --config tests/tiny_config.py:<config_arg> --workdir <workdir>``."""
    args = ["train.py", "--config", f"tests/tiny_config.py:{config_arg}", "--workdir"]
    return Process([*args, str(workdir), *flags], environment(devices, **env))
