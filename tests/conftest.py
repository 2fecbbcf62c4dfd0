"""Fixtures shared by the test modules that run every tiny model family.

``model`` is the tiny model of the ``family`` being tested; a module that tests other
families (the video ones) overrides ``family`` only.
"""

from __future__ import annotations

import pytest

from tiny_models import FAMILIES, tiny_model


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return tiny_model(family)
