"""The row rules of training data (JSONL), shared by the trainer's validator and `kubectl ftj create`."""

from __future__ import annotations

import pytest

from finetune_contract.training_data import InvalidTrainingData, parse_rows

GOOD = '{"prompt": "a", "completion": "b"}\n'

BAD_DATA = [
    pytest.param(GOOD * 16 + '{"prompt": "a"}\n', 'train_data line 17: missing "completion"', id="missing-completion"),
    pytest.param(GOOD + '{"completion": "b"}\n', 'train_data line 2: missing "prompt"', id="missing-prompt"),
    pytest.param(GOOD + '{"prompt": "a", "completion": \n', "train_data line 2: not valid JSON", id="invalid-json"),
    pytest.param(GOOD + '["a", "b"]\n', "train_data line 2: expected a JSON object, got list", id="not-an-object"),
    pytest.param(GOOD + '{"input": "a"}\n', 'train_data line 2: expected "text" or "prompt"', id="unknown-keys"),
    pytest.param(GOOD + '{"prompt": "a", "completion": 3}\n', 'line 2: "completion" must be a string', id="not-str"),
    pytest.param(GOOD + '{"prompt": "a", "completion": "  "}\n', 'line 2: "completion" is empty', id="empty"),
    pytest.param(GOOD + '{"text": "abc"}\n', 'train_data line 2: {"text"} row, but line 1 is a', id="mixed"),
    pytest.param('{"text": "a", "prompt": "b", "completion": "c"}\n', "train_data line 1: has both", id="both"),
    pytest.param(GOOD + '{"text": "\xff"}\n', "train_data line 2: not valid UTF-8", id="bad-utf8"),
    pytest.param("\n\n", "train_data: no rows", id="empty-file"),
]


@pytest.mark.parametrize(("content", "message"), BAD_DATA)
def test_bad_rows_are_rejected_with_their_line_number(content: str, message: str) -> None:
    raw = content.encode("latin-1") if "\xff" in content else content.encode()
    with pytest.raises(InvalidTrainingData) as caught:
        parse_rows(raw, "train_data")
    assert message in str(caught.value)


def test_blank_lines_are_skipped_and_line_numbers_stay_physical() -> None:
    with pytest.raises(InvalidTrainingData, match="line 4: missing"):
        parse_rows(f'{GOOD}\n\n{{"prompt": "x"}}\n'.encode(), "train_data")
    rows = parse_rows(f"\n{GOOD}\n{GOOD}".encode(), "train_data")
    assert rows.format == "prompt_completion"
    assert len(rows.rows) == 2
