"""R1's language-consistency reward (rlsys.math.language) on mixed-script text, counted by hand."""

import pytest

from rlsys.math.language import SCRIPTS, language_consistency, reasoning_text, words_by_script


def test_mixed_english_and_chinese_counted_by_hand():
    # words: Let, us, add, 然, 后, 相, 加, then, check -> 5 Latin, 4 Han (each character a word)
    text = "<think>Let us add 然后相加, then check: 2+3=5.</think><answer>5</answer>"
    assert language_consistency(text, "en") == pytest.approx(5 / 9)
    assert language_consistency(text, "zh") == pytest.approx(4 / 9)


def test_japanese_counts_kana_and_kanji_and_korean_hangul_words():
    # 計算 (Han) + します (Hiragana) + テスト (Katakana): 2 + 3 + 3 characters, each a word; "ok" is Latin
    text = "<think>計算します テスト ok</think>"
    assert language_consistency(text, "ja") == pytest.approx(8 / 9)
    assert language_consistency("<think>먼저 더하기 sum</think>", "ko") == pytest.approx(2 / 3)


def test_cyrillic_latin_arabic_and_a_word_that_changes_script():
    words = words_by_script("Сначала add جمع dasслово")
    assert words == [("Сначала", "Cyrillic"), ("add", "Latin"), ("جمع", "Arabic"), ("das", "Latin"),
                     ("слово", "Cyrillic")]
    assert language_consistency("<think>Сначала add جمع dasслово</think>", "ru") == pytest.approx(2 / 5)


def test_symbols_numbers_and_latex_are_neutral_and_bare_arithmetic_is_consistent():
    assert language_consistency("<think>x^2 + 3 = 7, so x = 2</think>", "en") == 1.0  # x, so, x
    assert language_consistency(r"<think>\frac{1}{2} 一半</think>", "zh") == pytest.approx(2 / 3)  # frac, 一, 半
    assert language_consistency("<think> 2 + 3 = 5 </think>", "en") == 1.0  # no word in any language: no mixing
    assert language_consistency("<think> 2 + 3 = 5 </think>", "zh") == 1.0
    assert language_consistency("<think> 2 + 3 = 五 </think>", "en") == 0.0


def test_reads_the_think_block_or_else_the_whole_completion():
    assert reasoning_text("a <think>b</think> c <think>d</think>") == "b"
    assert language_consistency("plain answer without tags 答案", "en") == pytest.approx(4 / 6)
    # the answer outside the block does not count
    assert language_consistency("<think>add them</think><answer>答案</answer>", "en") == 1.0


def test_an_unknown_language_is_refused_by_name():
    with pytest.raises(ValueError, match="reward.language must be one of .*'xx'"):
        language_consistency("<think>hi</think>", "xx")
    assert {"en", "zh", "ja", "ko", "ru", "ar"} <= set(SCRIPTS)


def test_doctests():
    import doctest

    from rlsys.math import language

    assert doctest.testmod(language).failed == 0
