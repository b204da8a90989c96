"""LM data, tokenizers and models: local text only, tokenizers trained here, every family trains sparse."""

import math

import pytest
import torch

import rigl_ds
from rigl_ds.layers import default_sparse_weights
from rigl_ds.lm import MASK_GROUPS, build_model, evaluate, lm_blocks, lm_loss, load_text, train_tokenizer


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """The first 3000 verses of the bundled text as a local file, to keep tests fast."""
    ds = load_text()
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text("\n".join(ds["train"][:3000]["text"]) + "\n")
    return load_text(path, validation_fraction=0.1)


def test_the_bundled_corpus_loads_through_datasets_with_a_contiguous_validation_tail():
    ds = load_text()
    assert len(ds["train"]) + len(ds["validation"]) == 31102
    assert ds["train"][0]["text"].startswith("In the beginning God created")
    assert ds["validation"][-1]["text"] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert len(ds["validation"]) == 31102 - int(31102 * 0.95)


def test_load_text_rejects_missing_files_and_bad_fractions(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="validation_fraction"):
        load_text(validation_fraction=1.0)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_tokenizers_are_trained_locally_and_round_trip(small_corpus, kind, tmp_path):
    tok = train_tokenizer(small_corpus["train"], kind, vocab_size=1000, save_dir=tmp_path)
    text = small_corpus["validation"][0]["text"] + "\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    if kind == "bpe":
        assert len(tok) == 1000 and len(tok(text)["input_ids"]) < len(text) / 2
    else:
        assert len(tok(text)["input_ids"]) == len(text)
    cached = train_tokenizer(small_corpus["train"], kind, vocab_size=1000, save_dir=tmp_path)
    assert cached(text)["input_ids"] == tok(text)["input_ids"]
    assert len(list(tmp_path.iterdir())) == 1
    with pytest.raises(ValueError, match="allowed: bpe, char"):
        train_tokenizer(small_corpus["train"], "wordpiece")


def test_blocks_have_the_sequence_length_and_count_their_characters(small_corpus):
    tok = train_tokenizer(small_corpus["train"], "char")
    blocks = lm_blocks(small_corpus["validation"], tok, 100)
    chars = sum(len(t) + 1 for t in small_corpus["validation"]["text"])
    assert len(blocks) == chars // 100
    rows = blocks[:]
    assert rows["input_ids"].shape == (chars // 100, 100)
    assert torch.all(rows["chars"] == 100)  # one character per token


def test_a_uniform_model_scores_log2_vocab_bits_per_char(small_corpus):
    tok = train_tokenizer(small_corpus["train"], "char")
    blocks = lm_blocks(small_corpus["validation"], tok, 50)

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            return torch.zeros(*ids.shape, len(tok)) + self.w

    result = evaluate(Uniform(), blocks, max_blocks=10)
    assert result["bits_per_char"] == pytest.approx(math.log2(len(tok)))
    assert result["perplexity"] == pytest.approx(len(tok))


@pytest.mark.parametrize(
    "family, expected",
    [
        ("gpt2", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("char_gru", ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "readout.0.weight", "readout.2.weight"]),
        ("word_lstm", ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1"]),
    ],
)
def test_each_family_sparsifies_its_projections_and_gates_and_keeps_embeddings_and_head_dense(family, expected):
    model = build_model(
        family, 300, **({"n_layer": 1} if family == "gpt2" else {"num_hidden_layers": 1} if family == "llama" else {})
    )
    names = default_sparse_weights(model)
    assert len(names) == len(expected) and all(e in n for n, e in zip(names, expected))
    assert not any(("embed" in n or "wte" in n or "wpe" in n or "head" in n) for n in names)


@pytest.mark.parametrize("family", ["gpt2", "llama", "char_gru", "word_lstm"])
def test_every_family_trains_sparse_with_its_mask_groups(small_corpus, family):
    torch.manual_seed(0)
    tok = train_tokenizer(small_corpus["train"], "char" if family == "char_gru" else "bpe", vocab_size=512)
    blocks = lm_blocks(small_corpus["train"], tok, 32)
    sizes = {
        "gpt2": dict(n_layer=1, n_embd=64, n_head=2),
        "llama": dict(
            num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1
        ),
        "char_gru": dict(embed=32, hidden=64, readout=(48, 32)),
        "word_lstm": dict(hidden=64),
    }[family]
    model = build_model(family, len(tok), **sizes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    block = {
        "sparsity": 0.8,
        "delta_t": 10,
        "end_step": 45,
        "distribution": "uniform",
        "mask_groups": MASK_GROUPS[family],
    }
    sparse = rigl_ds.sparsify(model, opt, block, total_steps=60)
    losses = []
    for step in range(60):
        ids = blocks[(step * 8) % (len(blocks) - 8) : (step * 8) % (len(blocks) - 8) + 8]["input_ids"]
        loss = lm_loss(model, ids)
        loss.backward()
        sparse.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.4  # nats per token
    for report in sparse.layer_report():
        assert report["sparsity"] == pytest.approx(0.8, abs=0.01)
    if MASK_GROUPS[family]:
        assert any(layer.blocks > 1 for layer in sparse.plan.layers)


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="allowed: gpt2, llama, char_gru, word_lstm"):
        build_model("bert", 100)


def test_a_local_hugging_face_directory_loads_without_the_hub(tmp_path):
    model = build_model("gpt2", 100, n_layer=1, n_embd=32, n_head=2)
    model.save_pretrained(tmp_path)
    loaded = build_model(str(tmp_path), 100)
    model.eval(), loaded.eval()
    ids = torch.randint(0, 100, (2, 8))
    assert torch.allclose(lm_loss(model, ids), lm_loss(loaded, ids))
