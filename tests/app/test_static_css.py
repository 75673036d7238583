"""The stylesheet parses as CSS: a browser drops a rule it cannot parse without a word, so a stray
brace left by an edit silently loses the rule after it (it once cost the compare tables' header rule)."""

from pathlib import Path

import tinycss2

STYLESHEET = Path(__file__).resolve().parents[2] / "static" / "app.css"


def _rules(nodes):
    for node in nodes:
        yield node
        if node.type == "at-rule" and node.content is not None and node.at_keyword in ("media", "supports"):
            yield from _rules(tinycss2.parse_rule_list(node.content, skip_comments=True, skip_whitespace=True))


def malformed_rules(css: str) -> list[str]:
    """Each rule a browser would drop for its syntax: parse errors, and selectors holding a brace
    or a semicolon (what a stray `}` or a missing `{` turns the next rule's selector into)."""
    found = []
    for rule in _rules(tinycss2.parse_stylesheet(css, skip_comments=True, skip_whitespace=True)):
        if rule.type == "error":
            found.append(f"line {rule.source_line}: {rule.message}")
        elif rule.type == "qualified-rule":
            selector = tinycss2.serialize(rule.prelude).strip()
            if any(ch in selector for ch in "{};") or not selector:
                found.append(f"line {rule.source_line}: selector {selector!r}")
    return found


def test_the_check_finds_a_stray_brace_and_a_missing_one():
    assert malformed_rules(".a { color: red; }\n}\n.b { color: blue; }") != []
    assert malformed_rules(".a { color: red; }\n.b color: blue; }\n.c { color: red; }") != []
    assert malformed_rules("@media (max-width: 800px) { .a { x: 1 } } .b { color: blue; } } .c { y: 2 }") != []
    assert malformed_rules("@media (max-width: 800px) { .a { x: 1 } }\n.b { color: blue; }") == []


def test_every_rule_of_the_stylesheet_parses():
    assert malformed_rules(STYLESHEET.read_text(encoding="utf-8")) == []
