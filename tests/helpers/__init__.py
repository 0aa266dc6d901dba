"""Code the tests share: real-image corpora, official-format SAM checkpoints, the resume check.

Imported as ``from helpers.<module> import ...`` (``tests/`` is on ``sys.path``: pytest's
``pythonpath`` setting in pyproject.toml). Nothing here is collected as a test.
"""
