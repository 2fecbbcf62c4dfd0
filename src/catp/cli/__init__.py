"""The ``catp`` command line.

:mod:`catp.cli.app` builds the app from one module per command (``eval``, ``bench``,
``explain``, ``diagnose``, ``demo``, ``methods``); :mod:`catp.cli.options` parses what the
commands share (``--keep``, ``--methods``, ``--dtype``, ``--device``, output paths), and
:mod:`catp.cli.errors` turns bad input into one usage line. A command imports its own
stack (plotting, datasets, rich) when it runs.
"""
