"""The embedded tiny default: a random Higgs Audio v2 model, text tokenizer, audio codec and speech-like data.

Everything is saved to a local dir and read back through the same ``from_pretrained`` path a real checkpoint
takes, so the tiny preset exercises the real loading and data code without any download.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|AUDIO_OUT|>", "<|audio_out_bos|>", "<|audio_eos|>", "<|reserved_special_token_6|>",
    "<|scene_desc_start|>", "<|scene_desc_end|>", "<|finetune_right_pad_id|>",
]
PAD_TOKEN = "<|finetune_right_pad_id|>"
WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars hum softly above "
         "quiet rivers and old green hills where small birds sing every morning").split()
SAMPLE_RATE = 24000
ASSETS_VERSION = "5"  # bumped when the assets change, so old asset dirs are rebuilt
# Llama 3's pre-tokenizer split (the real checkpoint's tokenizer): contractions, letter runs with one leading
# non-letter, digits in threes, punctuation runs with their newlines, newline runs, then spaces.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_text_tokenizer(out_dir: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Split like Llama 3 first (so "\n\n" after a chat header is one piece, as in the real tokenizer), then map
    # bytes to BPE symbols without GPT-2's own split.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(WORDS), "Generate audio following instruction.", "system user assistant\n\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token=PAD_TOKEN)
    fast.save_pretrained(out_dir)
    return fast


def build_codec(out_dir: Path):
    """A ~0.9 M-parameter codec at 25 frames/s with 8 codebooks of 1024 codes, like the real one, whose decoded
    audio depends on the codes (``_make_audible``)."""
    from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel

    cfg = HiggsAudioV2TokenizerConfig(
        target_bandwidths=[0.5, 1, 1.5, 2],
        codebook_dim=8,
        acoustic_model_config=dict(encoder_hidden_size=8, decoder_hidden_size=64, hidden_size=16,
                                   downsampling_ratios=[8, 5, 4, 2, 3], upsampling_ratios=[8, 5, 4, 2, 3]),
        semantic_model_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                   conv_dim=[16] * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
    )
    codec = HiggsAudioV2TokenizerModel(cfg).eval()
    _make_audible(codec)
    codec.save_pretrained(out_dir)
    return codec


DECODED_RMS = 0.1  # loudness of the tiny codec's decoded audio (random codes), well below clipping


@torch.no_grad()
def _make_audible(codec) -> None:
    """Random weights that make the decoded audio depend on the codes. transformers' init zeroes the codebooks
    (every frame would encode to code 0) and gives the decoder's convolutions std 0.02, so the signal dies out
    layer by layer and every code sequence decodes to the same quiet tone. Here every code is a random direction
    with its own loudness (spread over 300x in codebook 0, which dominates; the others are quieter), the decoder
    keeps the signal's scale through its layers, and the output is scaled to ``DECODED_RMS``: other codes give
    another waveform, loudness and spectrum. Encoding still picks varied codes (nearest codebook entries)."""
    for i, q in enumerate(codec.quantizer.quantizers):
        embed = q.codebook.embed
        loudness = torch.empty(embed.shape[0], 1).uniform_(math.log(0.01), math.log(3)).exp()
        embed.copy_(torch.nn.functional.normalize(torch.randn(embed.shape), dim=1) * 0.05 * loudness
                    * (1.0 if i == 0 else 0.2))
        q.codebook.embed_avg.copy_(embed)
    for m in codec.acoustic_decoder.modules():
        if isinstance(m, torch.nn.Conv1d):
            m.weight.normal_(0.0, (m.weight.shape[1] * m.weight.shape[2]) ** -0.5)
            m.bias.zero_()
        elif isinstance(m, torch.nn.ConvTranspose1d):  # each output sample sees kernel / stride taps per channel
            m.weight.normal_(0.0, (m.weight.shape[0] * m.weight.shape[2] / m.stride[0]) ** -0.5)
            m.bias.zero_()
    codes = torch.randint(0, codec.config.codebook_size, (4, codec.config.num_quantizers, 100))
    latent = codec.fc2(codec.quantizer.decode(codes.transpose(0, 1)).transpose(1, 2))
    codec.fc2.weight.div_(latent.std())
    codec.fc2.bias.zero_()
    codec.acoustic_decoder.conv2.weight.mul_(DECODED_RMS / codec.decode(codes).audio_values.std())


def build_model(out_dir: Path, tokenizer):
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    cfg = HiggsAudioV2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        num_codebooks=8, codebook_size=1026, audio_stream_bos_id=1024, audio_stream_eos_id=1025,
        audio_token_id=ids("<|AUDIO_OUT|>"), audio_bos_token_id=ids("<|audio_out_bos|>"),
        audio_delay_token_id=ids("<|reserved_special_token_6|>"), pad_token_id=ids(PAD_TOKEN),
        bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|eot_id|>"),
    )
    model = HiggsAudioV2ForConditionalGeneration(cfg, use_text_head=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_tiny_tts3(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random Higgs TTS 3 in the released layout: Qwen3 widths scaled down, the tiny v2 tokenizer plus the
    v3 special tokens, the tiny codec bundled (its config in ``audio_tokenizer/``, named by ``audio_tokenizer_id``).
    ``text_config.rope_theta`` is null, as in the release."""
    return build_tts3(out_dir, seed=seed)


# Two of the release's inline control tags, special tokens as there (docs/tts3.md)
TINY_CONTROL_TAGS = ("<|emotion:elation|>", "<|style:whispering|>")
# The tiny model's backbone: the release's text_config scaled down (vocab_size 0: the tokenizer's length)
TINY_QWEN3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=0, max_position_embeddings=4096)


def build_tts3(out_dir: str | Path, widths: dict | None = None, codec=None, dtype: torch.dtype = torch.float32,
               max_shard_size: str = "5GB", seed: int = 0) -> Path:
    """A random Higgs TTS 3 in the released layout: the release's text_config with ``widths`` over it (default
    ``TINY_QWEN3``; bench/real_size.py passes the release's own), initialised straight in ``dtype``, saved in
    shards of ``max_shard_size``; ``codec`` (default: the tiny one) bundled, its config in ``audio_tokenizer/``,
    which ``audio_tokenizer_id`` names."""
    from torch import nn

    from .tts3 import RELEASE_TEXT_CONFIG, WEIGHTS, HiggsTts3, build_config
    from .tts3_prompt import SPECIAL_TOKENS as TTS3_TOKENS

    out = Path(out_dir)
    tokenizer = build_text_tokenizer(out)
    tokenizer.add_special_tokens({"additional_special_tokens": [*TTS3_TOKENS, *TINY_CONTROL_TAGS]})
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    if codec is None:
        codec = build_codec(out / "audio_tokenizer")
        (out / "audio_tokenizer" / WEIGHTS).unlink()  # the weights travel in the bundle; only the config stays here
    else:
        codec.config.save_pretrained(out / "audio_tokenizer")
    text = {**RELEASE_TEXT_CONFIG, **(TINY_QWEN3 if widths is None else widths),
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    text["vocab_size"] = text["vocab_size"] or len(tokenizer)
    config = build_config(text, audio_tokenizer_id="audio_tokenizer")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no fp32 copy of a large model on the way
    try:
        model = HiggsTts3(config)
        nn.init.normal_(model.audio_embedding.weight, std=0.02)
    finally:
        torch.set_default_dtype(default)
    return model.save_pretrained(out, codec=codec, max_shard_size=max_shard_size)


SCORER_RATE = 16000
_TINY_WAV2VEC2 = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=2, do_stable_layer_norm=False)


def _scorer_features(return_attention_mask: bool):
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SCORER_RATE, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=return_attention_mask)


def build_asr(out_dir: Path, says: str = "a"):
    """A tiny CTC speech recognizer (``Wav2Vec2ForCTC`` + character tokenizer + feature extractor) whose output
    layer is rigged to emit the character ``says`` on every frame: CTC collapses the repeats, so it transcribes
    any audio as exactly ``says``: a known transcript through the real pipeline."""
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2ForCTC, Wav2Vec2Processor

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(out_dir / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                     word_delimiter_token="|")
    Wav2Vec2Processor(feature_extractor=_scorer_features(False), tokenizer=tokenizer).save_pretrained(out_dir)
    model = Wav2Vec2ForCTC(Wav2Vec2Config(**_TINY_WAV2VEC2, vocab_size=len(vocab), pad_token_id=0))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[vocab[says]] = 10.0
    model.save_pretrained(out_dir)
    return model


def build_whisper_asr(out_dir: Path):
    """A tiny Whisper (byte-level BPE tokenizer with Whisper's special tokens, 80-mel feature extractor, generation
    config with languages and tasks) rigged to end every transcript at once: it transcribes any audio as ``""``,
    through the real seq2seq pipeline, language and task prompts included."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([" ".join(WORDS)] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.model.save(str(out_dir))
    end = "<|endoftext|>"
    tokenizer = WhisperTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), unk_token=end,
                                 bos_token=end, eos_token=end, pad_token=end)
    special = ["<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>", "<|notimestamps|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80, sampling_rate=SCORER_RATE),
                     tokenizer=tokenizer).save_pretrained(out_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in [end, *special]}
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=64, pad_token_id=ids[end], bos_token_id=ids[end],
        eos_token_id=ids[end], decoder_start_token_id=ids["<|startoftranscript|>"]))
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids[end], pad_token_id=ids[end],
        bos_token_id=ids[end], no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=True,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|de|>": ids["<|de|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}, max_length=32,
        begin_suppress_tokens=[], suppress_tokens=[])
    with torch.no_grad():  # the output layer (tied to the token embeddings) sees one constant vector: end-of-text's
        # (the padding row, zero until now: Whisper pads with end-of-text), far longer than any other embedding
        norm = model.model.decoder.layer_norm
        model.model.decoder.embed_tokens.weight[ids[end]] = torch.ones(16)
        norm.weight.zero_()
        norm.bias.fill_(1.0)
    model.save_pretrained(out_dir)
    return model


def build_speaker(out_dir: Path):
    """A tiny random speaker-verification model (``WavLMForXVector``) with its feature extractor."""
    from transformers import WavLMConfig, WavLMForXVector

    cfg = WavLMConfig(**_TINY_WAV2VEC2, num_buckets=16, max_bucket_distance=64, tdnn_dim=(16, 16),
                      tdnn_kernel=(3, 1), tdnn_dilation=(1, 1), xvector_output_dim=8)
    model = WavLMForXVector(cfg).eval()
    model.save_pretrained(out_dir)
    _scorer_features(True).save_pretrained(out_dir)
    return model


# The demo's speech: a few voices saying a few phrases, every voice and phrase pair in both splits, each take at
# its own loudness (and a few at another rate or in stereo). What the model learns on train then carries over to
# validation, and the report of the default run shows a model learning. Takes differ in loudness only: the tiny
# random codec gives other codes for the slightest other noise or pitch, which would leave nothing to carry over.
SPEAKERS = {"ava": 0.8, "ben": 1.0, "cyd": 1.25}  # voice -> pitch factor
PHRASES = ("the quick brown fox jumps", "seven bright stars hum softly", "small birds sing every morning",
           "quiet rivers and old green hills")


def speech_like(text: str, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE, pitch: float = 1.0) -> np.ndarray:
    """Voiced syllables whose pitch and length follow the words (and the voice's ``pitch``), with pauses."""
    pieces = []
    for word in text.lower().strip(".").split():
        seed = sum(map(ord, word))
        f0 = (110 + (seed % 13) * 10) * pitch
        dur = 0.12 + (len(word) % 4) * 0.04
        t = np.arange(int(dur * sample_rate)) / sample_rate
        glide = f0 * (1 + 0.1 * np.sin(2 * np.pi * (seed % 5 + 1) * t))
        phase = 2 * np.pi * np.cumsum(glide) / sample_rate
        voice = sum(np.sin(h * phase) / h for h in range(1, 6))
        envelope = np.sin(np.pi * t / dur) ** 2
        pieces.append(0.25 * voice * envelope + 0.003 * rng.standard_normal(t.size))
        pieces.append(np.zeros(int(0.04 * sample_rate)))
    return np.concatenate(pieces).astype(np.float32)


def build_data(out_dir: Path, n_train: int = 16, n_val: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """Audio files and JSONL manifests: every voice and phrase pair in turn, each take at its own loudness; a few
    files use another rate or stereo so the real audio path runs."""
    rng = np.random.default_rng(seed)
    pairs = [(speaker, phrase) for phrase in PHRASES for speaker in SPEAKERS]
    (out_dir / "wav").mkdir(parents=True, exist_ok=True)
    manifests = {}
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 5)):
        lines = []
        for i in range(n):
            speaker, phrase = pairs[(i * 7 + offset) % len(pairs)]
            text = phrase.capitalize() + "."
            name = f"wav/{split}-{i:03d}.wav"
            sr = 16000 if i % 5 == 3 else SAMPLE_RATE
            voice = np.random.default_rng([seed, pairs.index((speaker, phrase))])  # the pair's own noise
            wave = rng.uniform(0.8, 1.2) * speech_like(text, voice, sr, SPEAKERS[speaker])
            if i % 7 == 5:
                wave = np.stack([wave, 0.8 * wave], axis=1)
            sf.write(out_dir / name, wave, sr)
            lines.append(json.dumps({"audio": name, "text": text, "speaker": speaker}))
        manifests[split] = out_dir / f"{split}.jsonl"
        manifests[split].write_text("\n".join(lines) + "\n")
    return manifests["train"], manifests["val"]


def ensure_tiny_assets(root: Path, seed: int = 0, preset: str = "tiny") -> dict[str, str]:
    """Build the assets of ``preset`` under ``root`` once (reused by resume and by later runs); return their paths.
    ``tiny-v3``: a tiny Higgs TTS 3 whose codec is bundled in its checkpoint (the model dir is the codec's too)."""
    v3 = preset == "tiny-v3"
    paths = {"model.base": root / "model", "model.audio_tokenizer": root / ("model" if v3 else "codec"),
             "data.train_manifest": root / "data" / "train.jsonl", "data.val_manifest": root / "data" / "val.jsonl"}
    ready, version = root / "READY", ASSETS_VERSION + ("-v3" if v3 else "")
    if not (ready.is_file() and ready.read_text() == version):
        torch.manual_seed(seed)
        if v3:
            shutil.rmtree(root / "model", ignore_errors=True)  # another preset's model must not linger beside it
            build_tiny_tts3(root / "model", seed)
        else:
            tok = build_text_tokenizer(root / "model")
            build_model(root / "model", tok)
            build_codec(root / "codec")
        build_data(root / "data", seed=seed)
        ready.write_text(version)
    return {k: str(v) for k, v in paths.items()}


def ensure_tiny_scorers(root: Path) -> dict[str, str]:
    """A tiny ASR (transcribes anything as "a") and speaker model under ``root``, built once: the scorers of a
    ``--preset tiny`` evaluation, through the real scoring code; return their config keys and paths."""
    paths = {"eval.asr_model": root / "asr", "eval.speaker_model": root / "speaker"}
    ready = root / "READY"
    if not (ready.is_file() and ready.read_text() == ASSETS_VERSION):
        torch.manual_seed(0)
        build_asr(paths["eval.asr_model"])
        build_speaker(paths["eval.speaker_model"])
        ready.write_text(ASSETS_VERSION)
    return {k: str(v) for k, v in paths.items()}


def apply_tiny_preset(cfg, root: Path) -> None:
    """Point the config's model, codec and data at the tiny assets, where the user has not set them. The preset's
    validation set goes only with its own training set: with the user's data, ``data.val_manifest`` or
    ``data.val_fraction`` of that data is the validation set (or there is none)."""
    own_data = bool(cfg.data.train_manifest)
    for key, value in ensure_tiny_assets(root, preset=cfg.preset).items():
        section, name = key.split(".")
        if own_data and key == "data.val_manifest":
            continue
        if not getattr(getattr(cfg, section), name):
            setattr(getattr(cfg, section), name, value)
