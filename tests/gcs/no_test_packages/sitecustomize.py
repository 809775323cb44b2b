"""On PYTHONPATH of the gs:// tests' train.py / eval.py processes: the test-only packages
(requirements-test.txt) cannot be imported there, so those runs prove that the README's
install (requirements.txt) is all a user needs for gs://."""

import sys

BLOCKED = ("gcp_storage_emulator",)


class _Blocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is a test-only package (requirements-test.txt)")
        return None


sys.meta_path.insert(0, _Blocker())
