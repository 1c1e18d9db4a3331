"""lookalike.cli: what reaches the terminal cannot be rewritten by a catalog's ids."""

from lookalike.cli import printable


def test_control_and_bidi_characters_are_escaped_printable_text_is_not():
    hostile = "SKU-1\x1b[2J\x1b[31mred\r\nfake line\u202eevil\u2066x\u2069\u200b\u2028\x7f\x9b"
    shown = printable(hostile)
    assert shown == ("SKU-1\\x1b[2J\\x1b[31mred\\x0d\\x0afake line\\u202eevil\\u2066x\\u2069\\u200b\\u2028"
                     "\\x7f\\x9b")
    assert all(ch.isprintable() for ch in shown)
    for fine in ("shoe-42", "café 中文 😀", "a b/c_d.e"):
        assert printable(fine) == fine
