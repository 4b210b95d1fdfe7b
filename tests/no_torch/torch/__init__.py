"""Stands in for torch in launcher subprocesses (see tests/launcher.py): importing it fails,
as in a `make run` install (requirements.txt has no torch)."""
raise ImportError("torch is not available in this test subprocess")
