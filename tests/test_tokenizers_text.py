"""Text tokenizer and box serialisation: exact round trips, special tokens, persistence, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenizers_mm import load_tokenizer
from tokenizers_mm.boxes import boxes_to_text, text_to_boxes
from tokenizers_mm.text import TextTokenizer
from training.data.shapes import generate_split


@pytest.fixture(scope="module")
def samples():
    return list(generate_split("train", 60))


@pytest.fixture(scope="module")
def tok(samples):
    texts = []
    for s in samples:
        texts.append(s["caption"])
        texts += [x for p in s["qa"] for x in (p["question"], p["answer"])]
        texts.append(boxes_to_text(s["boxes"], 64))
    return TextTokenizer.train(texts, vocab_size=600, num_sentinels=8, num_loc_bins=64,
                               class_names=["circle", "square", "triangle"])


def test_special_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.sentinel_ids == list(range(4, 12))
    assert tok.loc_id(0) == 12 and tok.loc_id(63) == 75
    assert tok.id_to_token(tok.loc_id(5)) == "<loc_5>"
    assert tok.id_to_token(tok.sentinel_ids[3]) == "[S_3]"
    with pytest.raises(ValueError, match="location bin"):
        tok.loc_id(64)


def test_sentinels_loc_and_classes_are_single_tokens(tok):
    for i in (0, 7):
        assert tok.encode_ids(f"[S_{i}]") == [tok.sentinel_ids[i]]
    for i in (0, 17, 63):
        assert tok.encode_ids(f"<loc_{i}>") == [tok.loc_id(i)]
    for name in ("circle", "square", "triangle"):
        assert len(tok.encode_ids(name)) == 1
    assert tok.encode_ids("<loc_3> <loc_4>") == [tok.loc_id(3), tok.loc_id(4)]


def test_round_trip_held_out_texts(tok):
    val = list(generate_split("val", 30))
    texts = [s["caption"] for s in val] + [p["question"] for s in val for p in s["qa"]]
    texts += [boxes_to_text(s["boxes"], 64) for s in val]
    texts += ["What  COLOR is the\tcircle?", "yes, it is: 2 (two)!", "unseen words like zebra, okay?"]
    ids = tok.encode(texts)
    assert ids.dtype == torch.long and ids.shape[0] == len(texts)
    decoded = tok.decode(ids)
    for text, out in zip(texts, decoded):
        assert out == tok.normalize(text)
    assert tok.normalize("  What  COLOR?\n") == "what color?"
    assert tok.unk_id not in ids.tolist()[-1]


def test_encode_layout_and_truncation(tok):
    ids = tok.encode(["a red circle", "a small red circle and a large blue square"])
    lengths = (ids != tok.pad_id).sum(1)
    for row, n in zip(ids, lengths):
        assert row[n - 1] == tok.eos_id and (row[n:] == tok.pad_id).all()
        assert tok.bos_id not in row.tolist()
    short = tok.encode("a small red circle and a large blue square", max_length=4)
    assert short.shape == (1, 4) and short[0, -1] == tok.eos_id
    padded = tok.encode("circle", max_length=10)
    assert padded.shape == (1, 10) and padded[0, 2:].eq(0).all()
    # decode stops at eos, drops pad and bos, prints sentinels / loc tokens
    row = [tok.bos_id, tok.sentinel_ids[0]] + tok.encode_ids("red") + [tok.loc_id(2), tok.eos_id] + tok.encode_ids("junk")
    assert tok.decode(row) == ["[S_0] red <loc_2>"]
    assert tok.decode(np.array([[tok.eos_id, 5]])) == [""]


def test_bad_input(tok):
    with pytest.raises(ValueError, match="empty"):
        tok.encode("   ")
    with pytest.raises(ValueError, match="empty"):
        tok.encode([])
    with pytest.raises(TypeError):
        tok.encode_ids(3)
    with pytest.raises(ValueError, match="max_length"):
        tok.encode("a", max_length=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size + 5])
    assert tok.encode("", allow_empty=True).tolist() == [[tok.eos_id]]


def test_save_load_and_transformers(tok, tmp_path):
    tok.save_pretrained(tmp_path / "text")
    again = load_tokenizer(tmp_path / "text")
    assert isinstance(again, TextTokenizer)
    texts = ["what shape is the red object?", "<loc_1> <loc_2> <loc_3> <loc_4> circle"]
    assert torch.equal(again.encode(texts), tok.encode(texts))
    assert again.vocab_size == tok.vocab_size and again.sentinel_ids == tok.sentinel_ids
    hf = tok.to_transformers()
    assert hf("what shape is it?").input_ids == tok.encode_ids("what shape is it?") + [tok.eos_id]
    assert hf.pad_token_id == 0 and hf.eos_token_id == tok.eos_id


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text('{"class": "Pickled"}')
    with pytest.raises(ValueError, match="unknown tokenizer class"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_boxes_round_trip_and_order():
    boxes = [{"box": [40.0, 10.0, 60.0, 30.0], "label": "Square"}, {"box": [3.0, 5.0, 20.5, 22.0], "label": "circle"}]
    text = boxes_to_text(boxes, 64, num_bins=64)
    assert text == boxes_to_text(boxes[::-1], 64, num_bins=64)  # order-independent
    assert text.startswith("<loc_3> <loc_5>") and text.endswith("square")
    back = text_to_boxes(text, 64, num_bins=64)
    assert [b["label"] for b in back] == ["circle", "square"]
    for b, ref in zip(back, [boxes[1], boxes[0]]):
        assert np.allclose(b["box"], ref["box"], atol=64 / 126 + 1e-6)
    # (height, width) image sizes
    wide = text_to_boxes(boxes_to_text(boxes, (64, 128), 64), (64, 128), 64)
    assert np.allclose(wide[1]["box"], boxes[0]["box"], atol=1.02)
    assert boxes_to_text([], 64) == ""


def test_text_to_boxes_tolerates_malformed_text():
    text = ("garbage <loc_1> <loc_2> <loc_3> circle <loc_4> <loc_5> <loc_6> <loc_7> square [S_0] "
            "<loc_9> <loc_99> <loc_10> <loc_11> triangle <loc_20> <loc_10> <loc_5> <loc_30> big circle <loc_1> <loc_2>")
    boxes = text_to_boxes(text, 63, num_bins=64)
    assert [b["label"] for b in boxes] == ["square", "big circle"]
    assert boxes[0]["box"] == [4.0, 5.0, 6.0, 7.0]
    assert boxes[1]["box"] == [5.0, 10.0, 20.0, 30.0]  # swapped corners put back in order
    assert text_to_boxes("", 64) == []
    with pytest.raises(ValueError):
        boxes_to_text([{"box": [5, 5, 1, 1], "label": "x"}], 64)
    with pytest.raises(ValueError):
        boxes_to_text([{"box": [1, 1, 5, 5]}], 64)


def test_training_is_deterministic_and_open_vocabularies_use_subwords(samples, tok):
    """Closed vocabulary (every word fits): whole words, identical across trainings (the WordPiece trainer breaks
    count ties in hash order). More distinct words than the budget: subwords from the WordPiece trainer, and any
    ASCII text still round-trips."""
    texts = [s["caption"] for s in samples]
    a, b = (TextTokenizer.train(texts, vocab_size=600, num_sentinels=8, num_loc_bins=64,
                                class_names=["circle", "square", "triangle"]) for _ in range(2))
    assert a._tok.to_str() == b._tok.to_str()
    assert a.encode("a small red circle.").shape[1] == 5  # 4 whole words + eos
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=6)) for _ in range(400)]
    open_vocab = TextTokenizer.train([" ".join(words[i:i + 8]) for i in range(0, 400, 4)], vocab_size=260,
                                     num_sentinels=8, num_loc_bins=64)
    assert open_vocab.vocab_size <= 300  # the trainer's budget (+ nothing added), far fewer than 400 words
    held_out = "jihgfe abcdef deadbeef!"
    assert open_vocab.decode(open_vocab.encode(held_out))[0] == held_out
