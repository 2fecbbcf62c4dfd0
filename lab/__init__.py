"""The lab: the recipe that trains catp's reference model, its probes and its floor checks.

Run from a checkout's root (``python -m lab.train``, ``python -m lab.evaluate``,
``python -m lab.probe``); it is not part of the installed package. The lab imports
``catp``; ``catp`` never imports the lab.
"""
