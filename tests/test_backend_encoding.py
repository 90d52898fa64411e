"""The backend's own urlencode is urllib's, character for character, on any text."""

import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xcflushd.backend import urlencode

# Any code point, lone surrogates included (credentials decoded with surrogateescape carry them).
text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=()), max_size=40)
plain = st.text("abcXYZ019_.~-[]", max_size=20)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.one_of(plain, text), st.one_of(plain, text)), max_size=8))
def test_urlencode_is_urllibs(params):
    try:
        expected = urllib.parse.urlencode(params, errors="surrogateescape")
    except UnicodeEncodeError:  # a surrogate that surrogateescape did not make: both refuse it
        with pytest.raises(UnicodeEncodeError):
            urlencode(params)
        return
    assert urlencode(params) == expected


def test_report_names_and_credentials_with_reserved_characters_are_quoted():
    params = [("transactions[0][usage][hits]", "1"), ("app_key", "a b&c=d+é"), ("referrer", "*.example.com")]
    assert urlencode(params) == ("transactions%5B0%5D%5Busage%5D%5Bhits%5D=1&app_key=a+b%26c%3Dd%2B%C3%A9"
                                 "&referrer=%2A.example.com")
