import pytest

import ctp


def test_every_public_name_resolves():
    for name in ctp.__all__:
        assert getattr(ctp, name) is not None, name
    with pytest.raises(AttributeError):
        ctp.no_such_thing  # noqa: B018
