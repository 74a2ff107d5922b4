"""R1's language-consistency reward: the share of the reasoning's words written in the target language.

DeepSeek-R1 added it in its reasoning RL stage because R1-Zero's chains of thought mixed
languages (R1.md). The paper counts target-language words; rlsys decides a word's language by its
Unicode script (regex's \\p{Script} classes), so the rule needs no model and scores any text in
microseconds. What counts as a word:
- a run of letters in a script written with spaces (Latin, Cyrillic, Greek, Arabic, Hebrew,
  Devanagari, Hangul, Thai...) is one word; a run that mixes scripts is split where the script changes;
- every Han, Hiragana or Katakana character is a word of its own (those scripts use no spaces);
- digits, punctuation, math symbols and LaTeX markup are no words (neither for nor against):
  `x^2 + 3 = 7` is language-neutral, `\\frac` counts as the Latin word "frac".
The reward is target words / all words, in [0, 1]. Reasoning without a single word (`3 + 4 = 7`)
scores 1: the reward measures mixing, and symbols are in no language (found on SmolLM2's digit
sums, where most correct chains of thought are bare arithmetic: scored 0, rejection sampling
threw them all away as "not English"). Which text is read: the inside of the
first <think>...</think> block when the completion has one, else the whole completion.

    >>> language_consistency("<think> so 2 + 3 = 5 </think> <answer> 5 </answer>", "en")
    1.0
    >>> language_consistency("<think> first 先算 then add </think>", "en")
    0.6
    >>> language_consistency("<think> 先算 2+3 </think>", "zh")
    1.0
    >>> language_consistency("<think> 2 + 3 = 5 </think>", "en")
    1.0
"""

from __future__ import annotations

import regex

SCRIPTS: dict[str, tuple[str, ...]] = {
    "en": ("Latin",), "fr": ("Latin",), "de": ("Latin",), "es": ("Latin",), "it": ("Latin",), "pt": ("Latin",),
    "nl": ("Latin",), "pl": ("Latin",), "tr": ("Latin",), "vi": ("Latin",), "id": ("Latin",),
    "zh": ("Han",), "ja": ("Han", "Hiragana", "Katakana"), "ko": ("Hangul", "Han"),
    "ru": ("Cyrillic",), "uk": ("Cyrillic",), "el": ("Greek",), "ar": ("Arabic",), "fa": ("Arabic",),
    "he": ("Hebrew",), "hi": ("Devanagari",), "th": ("Thai",),
}
"""Language code -> the scripts its words are written in (reward.language takes these codes)."""

UNSPACED = ("Han", "Hiragana", "Katakana")
_WORD = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]|[^\P{L}\p{Han}\p{Hiragana}\p{Katakana}]+")
"""One unspaced character, or a run of other letters (split by script below)."""
_THINK = regex.compile(r"<think>(.*?)</think>", regex.DOTALL)
_SCRIPT_RUNS = {name: regex.compile(rf"\p{{Script={name}}}+") for name in
                {s for scripts in SCRIPTS.values() for s in scripts}}


def words_by_script(text: str) -> list[tuple[str, str]]:
    """(word, script) for every word of `text`; script is one of SCRIPTS' or "Other".

    >>> words_by_script("Hi мир, 世界! x2")
    [('Hi', 'Latin'), ('мир', 'Cyrillic'), ('世', 'Han'), ('界', 'Han'), ('x', 'Latin')]
    >>> words_by_script("dasслово")
    [('das', 'Latin'), ('слово', 'Cyrillic')]
    """
    out = []
    for word in _WORD.findall(text):
        while word:
            script, length = "Other", 1
            for name, run in _SCRIPT_RUNS.items():
                found = run.match(word)
                if found:
                    script, length = name, found.end()
                    break
            if script == "Other":  # letters of a script no language here uses: one word up to a known script
                ahead = [m.start() for m in (r.search(word) for r in _SCRIPT_RUNS.values()) if m]
                length = min(ahead, default=len(word)) or 1
            out.append((word[:length], script))
            word = word[length:]
    return out


def reasoning_text(completion: str) -> str:
    """The text the reward reads: the first <think> block's inside, else the whole completion."""
    found = _THINK.search(completion)
    return found.group(1) if found else completion


def language_consistency(completion: str, language: str) -> float:
    """Share of the reasoning's words in `language`'s scripts (module docstring), in [0, 1]."""
    if language not in SCRIPTS:
        raise ValueError(f"reward.language must be one of {sorted(SCRIPTS)}, got {language!r}")
    words = words_by_script(reasoning_text(completion))
    if not words:
        return 1.0
    target = SCRIPTS[language]
    return sum(script in target for _, script in words) / len(words)
