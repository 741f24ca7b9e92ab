"""Token stream: position filtering, packing, seeded shuffling and the held-out split, on real text."""

from __future__ import annotations

import json

import pytest
import torch

from saesweep.activations import embedded
from saesweep.activations.documents import DocumentSource
from saesweep.activations.tokens import (
    TokenPolicy,
    TokenStream,
    pack_windows,
    served_positions,
    tokenize_documents,
)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded.prepare_embedded_model())


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded.prepare_gpt2_tokenizer())


@pytest.fixture(scope="module")
def smollm2_policy(smollm2_tokenizer):
    separator = smollm2_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return TokenPolicy(
        prepend_bos=False,
        bos_token_id=smollm2_tokenizer.bos_token_id,
        separator_token_id=separator,
        special_token_ids=(separator, smollm2_tokenizer.bos_token_id, smollm2_tokenizer.eos_token_id),
    )


@pytest.fixture(scope="module")
def gpt2_policy():
    return TokenPolicy(
        prepend_bos=True, bos_token_id=50256, separator_token_id=50256, special_token_ids=(50256,)
    )


@pytest.fixture(scope="module")
def paragraphs():
    """Forty real paragraphs of Hamlet, each at least 200 characters long."""
    hamlet = next(p for p in embedded.embedded_corpus_files() if p.name == "hamlet_gut.txt")
    blocks = [b.strip() for b in hamlet.read_text(encoding="utf-8").split("\n\n")]
    long_blocks = [b for b in blocks if len(b) >= 200]
    return long_blocks[:40]


@pytest.fixture()
def jsonl_file(tmp_path, paragraphs):
    path = tmp_path / "hamlet.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for text in paragraphs:
            f.write(json.dumps({"text": text, "source": "hamlet"}) + "\n")
    return path


def test_served_positions_padding_and_mid_bos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    pad, bos = tok.pad_token_id, tok.bos_token_id
    first = tok("Who's there?", add_special_tokens=False)["input_ids"]
    second = tok("Nay, answer me: stand, and unfold yourself.", add_special_tokens=False)["input_ids"]
    width = len(first) + 1 + len(second)
    n_pad = width - len(first)

    rows, masks, expected = [], [], []
    # Left padding: the first real token sits at column n_pad and is dropped like position 0.
    rows.append([pad] * n_pad + first)
    masks.append([0] * n_pad + [1] * len(first))
    expected.append(list(range(n_pad + 1, width)))
    # Right padding.
    rows.append(first + [pad] * n_pad)
    masks.append([1] * len(first) + [0] * n_pad)
    expected.append(list(range(1, len(first))))
    # A BOS in the middle of an unpadded row.
    rows.append(first + [bos] + second)
    masks.append([1] * width)
    expected.append([i for i in range(1, width) if i != len(first)])
    # BOS at position 0, then text: only the text after it stays, its first token included.
    rows.append([bos] + second + [pad] * len(first))
    masks.append([1] * (1 + len(second)) + [0] * len(first))
    expected.append(list(range(1, 1 + len(second))))

    tokens = torch.tensor(rows)
    keep = served_positions(tokens, torch.tensor(masks), {pad, bos, tok.eos_token_id})

    assert keep.shape == tokens.shape
    assert keep.dtype == torch.bool
    for row, positions in enumerate(expected):
        assert keep[row].nonzero().flatten().tolist() == positions, f"row {row}"


def test_served_positions_without_mask(gpt2_tokenizer):
    ids = gpt2_tokenizer("To be, or not to be", add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([[50256] + ids, ids + [50256]])

    keep = served_positions(tokens, None, [50256])

    assert keep[0].tolist() == [False] + [True] * len(ids)
    assert keep[1].tolist() == [False] + [True] * (len(ids) - 1) + [False]


def test_served_positions_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="attention_mask shape"):
        served_positions(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 3), [0])


@pytest.mark.parametrize("policy_name", ["smollm2", "gpt2"])
def test_pack_windows_full_with_separators(request, policy_name, paragraphs):
    tokenizer = request.getfixturevalue(f"{policy_name}_tokenizer")
    policy = request.getfixturevalue(f"{policy_name}_policy")
    context_size = 24
    documents = list(tokenize_documents(paragraphs[:10], tokenizer))

    windows = list(pack_windows(documents, context_size=context_size, policy=policy))

    assert windows
    assert all(len(w) == context_size for w in windows)
    if policy.prepend_bos:
        assert all(w[0] == policy.bos_token_id for w in windows)
        bodies = [w[1:] for w in windows]
    else:
        bodies = windows
    stream = []
    for index, document in enumerate(documents):
        if index > 0:
            stream.append(policy.separator_token_id)
        stream.extend(document)
    packed = [t for body in bodies for t in body]
    # The windows are the separated stream in order, cut into pieces, with the tail dropped.
    assert packed == stream[: len(packed)]
    assert len(stream) - len(packed) < len(bodies[0])
    assert packed.count(policy.separator_token_id) == (
        stream[: len(packed)].count(policy.separator_token_id)
    )


def test_pack_windows_rejects_context_without_room(gpt2_policy):
    with pytest.raises(ValueError, match="context_size=1"):
        list(pack_windows([[1, 2, 3]], context_size=1, policy=gpt2_policy))


def test_stream_batches_shape_and_keep(smollm2_tokenizer, smollm2_policy, jsonl_file):
    stream = TokenStream(
        jsonl_file, smollm2_tokenizer, smollm2_policy, context_size=32, batch_size=4, seed=3
    )

    batches = list(stream)

    assert len(batches) > 2
    for batch in batches[:-1]:
        assert batch.tokens.shape == (4, 32)
        assert batch.tokens.dtype == torch.int64
        assert batch.keep.shape == (4, 32)
        assert batch.keep.dtype == torch.bool
    tokens = torch.cat([b.tokens for b in batches])
    keep = torch.cat([b.keep for b in batches])
    assert not keep[:, 0].any()
    assert not keep[tokens == smollm2_policy.separator_token_id].any()
    assert (tokens == smollm2_policy.separator_token_id).any()
    assert keep[:, 1:][tokens[:, 1:] != smollm2_policy.separator_token_id].all()


def test_stream_seed_controls_order(smollm2_tokenizer, smollm2_policy):
    def first_batches(seed):
        stream = TokenStream(
            "embedded",
            smollm2_tokenizer,
            smollm2_policy,
            context_size=16,
            batch_size=8,
            seed=seed,
            shuffle_windows=64,
        )
        batches = []
        for batch in stream:
            batches.append(batch.tokens)
            if len(batches) == 3:
                return torch.cat(batches)

    first = first_batches(seed=1)
    again = first_batches(seed=1)
    other = first_batches(seed=2)

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_stream_shuffles_windows(gpt2_tokenizer, gpt2_policy, jsonl_file):
    def windows(shuffle_windows):
        stream = TokenStream(
            jsonl_file,
            gpt2_tokenizer,
            gpt2_policy,
            context_size=16,
            batch_size=8,
            shuffle_windows=shuffle_windows,
        )
        return [tuple(w) for w in stream.windows()]

    packed_order = windows(shuffle_windows=1)
    shuffled = windows(shuffle_windows=32)

    assert sorted(shuffled) == sorted(packed_order)
    assert shuffled != packed_order


def test_epochs_reorder_documents(smollm2_tokenizer, smollm2_policy, jsonl_file):
    stream = TokenStream(
        jsonl_file, smollm2_tokenizer, smollm2_policy, context_size=16, batch_size=4, num_epochs=2
    )

    documents = list(stream.documents())
    half = len(documents) // 2

    assert sorted(documents[:half]) == sorted(documents[half:])
    assert documents[:half] != documents[half:]


def test_heldout_split_embedded_corpus():
    train = DocumentSource("embedded", split="train")
    heldout = DocumentSource("embedded", split="heldout")
    train_texts = set(train.documents())
    heldout_texts = set(heldout.documents())

    assert len(heldout) >= 1
    assert len(train) + len(heldout) == len(embedded.embedded_corpus_files())
    assert not train_texts & heldout_texts
    assert len(heldout) == round(0.05 * (len(train) + len(heldout)))


def test_heldout_split_stream_disjoint(smollm2_tokenizer, smollm2_policy, jsonl_file, paragraphs):
    def stream(split, seed):
        return TokenStream(
            jsonl_file,
            smollm2_tokenizer,
            smollm2_policy,
            context_size=16,
            batch_size=4,
            seed=seed,
            split=split,
            heldout_fraction=0.25,
        )

    train = list(stream("train", seed=0).documents())
    heldout = list(stream("heldout", seed=0).documents())
    heldout_other_shuffle = list(stream("heldout", seed=5).documents())

    assert len(heldout) == 10
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(paragraphs)
    # The shuffle seed reorders documents but never moves one across the split.
    assert sorted(heldout_other_shuffle) == sorted(heldout)


def test_split_seed_changes_heldout(jsonl_file):
    first = set(DocumentSource(jsonl_file, split="heldout", heldout_fraction=0.25).documents())
    second = set(
        DocumentSource(jsonl_file, split="heldout", heldout_fraction=0.25, split_seed=1).documents()
    )

    assert first != second


def test_local_text_folder(tmp_path, paragraphs):
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    for index, text in enumerate(paragraphs[:6]):
        (text_dir / f"doc{index}.txt").write_text(text + "\n", encoding="utf-8")

    train = DocumentSource(text_dir, heldout_fraction=0.2)
    heldout = DocumentSource(text_dir, split="heldout", heldout_fraction=0.2)
    texts = [t.strip() for t in train.documents()] + [t.strip() for t in heldout.documents()]

    assert len(train) == 5
    assert len(heldout) == 1
    assert sorted(texts) == sorted(paragraphs[:6])


def test_local_parquet_file(tmp_path, paragraphs, gpt2_tokenizer, gpt2_policy):
    from datasets import Dataset

    parquet_file = tmp_path / "docs.parquet"
    Dataset.from_dict({"body": paragraphs[:6]}).to_parquet(parquet_file)

    train = DocumentSource(parquet_file, heldout_fraction=0.2, text_column="body")
    stream = TokenStream(
        parquet_file, gpt2_tokenizer, gpt2_policy, context_size=8, batch_size=2, text_column="body"
    )
    batch = next(iter(stream))

    assert len(train) == 5
    assert set(train.documents()) <= set(paragraphs[:6])
    assert batch.tokens.shape == (2, 8)
    assert batch.tokens[:, 0].tolist() == [50256, 50256]


def test_missing_text_column_named(jsonl_file):
    with pytest.raises(ValueError, match="no column 'body'.*'source'"):
        DocumentSource(jsonl_file, text_column="body")


def test_missing_local_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        DocumentSource([tmp_path / "missing.jsonl"])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        DocumentSource(str(tmp_path / "missing.txt"))


def test_unknown_split_rejected(jsonl_file):
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        DocumentSource(jsonl_file, split="test")


def test_prepend_bos_needs_bos_id():
    with pytest.raises(ValueError, match="bos_token_id"):
        TokenPolicy(prepend_bos=True, bos_token_id=None, separator_token_id=0, special_token_ids=(0,))


def test_blank_documents_skipped(tmp_path, paragraphs):
    path = tmp_path / "with_blanks.jsonl"
    rows = [paragraphs[0], "", paragraphs[1], "  \n ", paragraphs[2]]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")

    train = DocumentSource(path, heldout_fraction=0.3)
    heldout = DocumentSource(path, split="heldout", heldout_fraction=0.3)

    assert len(train) + len(heldout) == 3
    assert sorted([*train.documents(), *heldout.documents()]) == sorted(paragraphs[:3])


def test_split_too_short_for_window(jsonl_file, gpt2_tokenizer, gpt2_policy):
    stream = TokenStream(
        jsonl_file,
        gpt2_tokenizer,
        gpt2_policy,
        context_size=100_000,
        batch_size=1,
        split="heldout",
        num_epochs=None,
    )
    with pytest.raises(ValueError, match="too few tokens for one window of 100000"):
        next(iter(stream))
