"""The ``catp`` command line.

:mod:`catp.cli.app` builds the app from one module per command (``eval``, ``bench``,
``explain``, ``diagnose``, ``demo``, ``adapt``, ``methods``); :mod:`catp.cli.options` parses and
checks what the commands share (``--keep``, ``--methods``, output and input paths, adapter
folders, ranges, options that would be ignored), and :mod:`catp.cli.errors` turns bad input
into one usage line (exit status 2) and Ctrl-C into one line (exit status 130). A command imports its own
stack (plotting, datasets, rich) when it runs.
"""
