"""SentencePiece vocabularies made on the fly, written as GGUF files the way llama.cpp writes them.

No Hub access: a small SentencePiece BPE model (byte fallback, identity normalization, split digits:
Llama 2's training options) is trained on a generated multilingual corpus, then written with
``gguf.GGUFWriter`` and llama.cpp's own ``gguf.vocab.SentencePieceVocab`` (tokens, scores, token
types incl. CONTROL / UNKNOWN / BYTE), plus what ``convert_hf_to_gguf.py`` adds from a model's
tokenizer_config.json: USER_DEFINED types for added non-special tokens (with "▁" written as a space),
special ids, add_bos/add_eos and add_space_prefix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

SPACE = "\u2581"

# The text set every GGUF vocabulary is compared on: scripts, emoji, code, spaces, digits.
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "   ",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple    inner     spaces",
    "Größere Äpfel schmecken süßer. Straße, Brücke, Mädchen",
    "Le garçon a mangé une crème brûlée à côté de l'hôtel. Où ? Ça !",
    "我们今天去公园散步，天气非常好。机器学习模型需要大量的数据。",
    "今日はとても良い天気ですね。東京の電車は時間通りに来ます。カタカナ",
    "Быстрая коричневая лиса прыгает через ленивую собаку. Привет!",
    "مرحبا بالعالم. اللغة العربية جميلة جدا.",
    "नमस्ते दुनिया। मुझे हिंदी सीखना पसंद है।",
    "한국어 텍스트와 ภาษาไทย and Ελληνικά",  # scripts the SentencePiece corpus lacks: byte fallback
    "emoji 🎉🚀 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽 rainbow 🏳️‍🌈 heart ❤️",
    "def main(argv):\n    for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(f\"even {i}\")\n    return 0\n",
    "class Foo:\n    def __init__(self, x: int) -> None:\n        self.x = x  # store\n\n\n",
    "if (a && b) { return a[0] >= b->c; } // C++\r\n",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F 2024-05-17 100%",
    "combining e\u0301 vs \u00e9, nbsp\u00a0here, zero\u200bwidth, bom\ufeff",
    "tabs\tand\nnewlines\r\n\n\nmore\n",
    "\nstarts with a newline",
    "A" * 300,
    "mixed CASE camelCase snake_case kebab-case",
    "It's they're we'll I'd don't",
]


@dataclass(frozen=True)
class SpmLayout:
    """Where the special pieces sit and which tokens the GGUF marks control or user-defined."""

    arch: str
    add_dummy_prefix: bool
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int  # -1: none
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"
    control: tuple[str, ...] = ()  # special: True in tokenizer_config -> CONTROL
    user_defined: tuple[str, ...] = ()  # special: False in tokenizer_config -> USER_DEFINED

    @property
    def specials_in_text(self) -> list[str]:
        named = [self.bos_piece, self.eos_piece, self.unk_piece] + ([self.pad_piece] if self.pad_id >= 0 else [])
        return named + list(self.control) + [t.replace(SPACE, " ") for t in self.user_defined]


# Llama 2 / Mistral: <unk> <s> </s> first, a space prefix, [INST]-style control tokens.
LLAMA_LAYOUT = SpmLayout(arch="llama", add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                         control=("[INST]", "[/INST]"), user_defined=("<think>", "</think>"))
# Gemma: <pad> <eos> <bos> <unk> <mask>, no space prefix, whitespace runs as user-defined pieces.
GEMMA_LAYOUT = SpmLayout(arch="gemma2", add_dummy_prefix=False, unk_id=3, bos_id=2, eos_id=1, pad_id=0,
                         unk_piece="<unk>", bos_piece="<bos>", eos_piece="<eos>", pad_piece="<pad>",
                         control=("<mask>", "<start_of_turn>", "<end_of_turn>"),
                         user_defined=("<think>", "</think>", SPACE * 2, SPACE * 4, "\t\t"))
# Phi-3: Llama 2's pieces, chat control tokens.
PHI3_LAYOUT = SpmLayout(arch="phi3", add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                        control=("<|user|>", "<|assistant|>", "<|end|>"), user_defined=("<think>",))


_SEEDS = [
    "The quick brown fox jumps over the lazy dog. Tokenizers split text into pieces that a model reads.",
    "Serving engines batch requests and stream tokens back to clients over HTTP with low latency.",
    "It's a beautiful day; we'll walk to the station and they're meeting us at noon, don't worry.",
    "Größere Äpfel schmecken süßer als grüne Birnen. Die Straße führt über die Brücke zum Bahnhof.",
    "Könnten Sie mir bitte helfen? Das Mädchen liest ein Buch über Wissenschaft und Geschichte.",
    "Le garçon a mangé une crème brûlée à côté de l'hôtel. Où est la bibliothèque ? Ça va très bien.",
    "Nous étions déjà arrivés quand la fenêtre s'est ouverte ; l'été était très chaud cette année.",
    "我们今天去公园散步，天气非常好。机器学习模型需要大量的数据。这个服务器每秒可以处理很多请求。",
    "中文文本的分词是一个有趣的问题，我们需要考虑词语的边界和上下文的意思。",
    "今日はとても良い天気ですね。東京の電車は時間通りに来ます。私はラーメンと寿司が好きです。",
    "日本語の文章を読むのは難しいですが、毎日勉強すれば上手になります。カタカナとひらがな。",
    "Быстрая коричневая лиса прыгает через ленивую собаку. Москва является столицей России.",
    "Привет, как дела? Сегодня хорошая погода, и мы пойдём гулять в парк вместе с друзьями.",
    "مرحبا بالعالم. اللغة العربية جميلة جدا. أين المكتبة من فضلك؟ شكرا جزيلا لك يا صديقي.",
    "नमस्ते दुनिया। मुझे हिंदी सीखना पसंद है। यह एक परीक्षण वाक्य है। भारत एक बड़ा देश है।",
    "def main(argv):\n    for i in range(10):\n        if i % 2 == 0:\n            print(f\"even {i}\")\n    return 0",
    "class Foo:\n\tdef __init__(self, x: int) -> None:\n\t\tself.x = x  # store the value\n",
    "if (a && b) { return a[0] >= b->c; } else { x += 1; } // comment /* block */",
    "I love pizza 🍕 and coffee ☕! Party time 🎉🎉 with family 👨‍👩‍👧 today 😀 👍",
    "Version 3.14.159 released on 2024-05-17 with 1234567 downloads and 42% growth, 0x1F.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 and more numbers like 271828 and 31415.",
]


def corpus(n_lines: int = 12000, seed: int = 0) -> list[str]:
    """Random spans of the seed sentences, with varied spacing, as SentencePiece training lines."""
    rng = random.Random(seed)
    words = [s.split(" ") for s in _SEEDS]
    lines = []
    for _ in range(n_lines):
        ws = words[rng.randrange(len(words))]
        i = rng.randrange(len(ws))
        span = ws[i:i + rng.randrange(2, 14)]
        sep = rng.choice([" ", " ", " ", "  ", "    "])
        lines.append(sep.join(span))
    return lines


def train_sentencepiece(layout: SpmLayout, vocab_size: int = 3000) -> bytes:
    """A serialized SentencePiece BPE model for ``layout`` (about ``vocab_size`` pieces)."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=out, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=layout.add_dummy_prefix,
        allow_whitespace_only_pieces=True, character_coverage=0.9995, max_sentencepiece_length=16,
        unk_id=layout.unk_id, bos_id=layout.bos_id, eos_id=layout.eos_id, pad_id=layout.pad_id,
        unk_piece=layout.unk_piece, bos_piece=layout.bos_piece, eos_piece=layout.eos_piece,
        pad_piece=layout.pad_piece, control_symbols=list(layout.control),
        user_defined_symbols=list(layout.user_defined), num_threads=1, minloglevel=2,
    )
    return out.getvalue()


def write_spm_gguf(path: Path, model_proto: bytes, layout: SpmLayout, *, add_space_prefix: bool | None = None,
                   add_bos: bool | None = True, add_eos: bool | None = False,
                   chat_template: str | None = None, same_score: float | None = None) -> Path:
    """``model_proto`` as a tokenizer-only GGUF (no tensors) at ``path``.

    ``add_*=None`` leaves that key out of the file, as older converters did. ``same_score`` writes
    that score for every token, as llama.cpp's ``LlamaHfVocab`` does (-1000.0) for a vocabulary read
    from tokenizer.json.
    """
    import gguf
    from gguf.vocab import SentencePieceVocab

    # NOTE: SentencePieceVocab reads tokenizer.model from a folder; keep it out of the GGUF's folder,
    # where transformers would pick it up instead of the GGUF.
    src = path.parent / f"{path.stem}-spm"
    src.mkdir(parents=True, exist_ok=True)
    (src / "tokenizer.model").write_bytes(model_proto)
    tokens, scores, types = [], [], []
    for text, score, toktype in SentencePieceVocab(src).all_tokens():
        piece = text.decode("utf-8")
        if piece in layout.user_defined:
            # convert_hf_to_gguf: added tokens that are not special become USER_DEFINED, their "▁"
            # written as a real space.
            piece, toktype = piece.replace(SPACE, " "), gguf.TokenType.USER_DEFINED
        elif piece in layout.control:
            toktype = gguf.TokenType.CONTROL
        tokens.append(piece)
        scores.append(score if same_score is None else same_score)
        types.append(toktype)
    w = gguf.GGUFWriter(str(path), layout.arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(layout.bos_id)
    w.add_eos_token_id(layout.eos_id)
    w.add_unk_token_id(layout.unk_id)
    if layout.pad_id >= 0:
        w.add_pad_token_id(layout.pad_id)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    prefix = layout.add_dummy_prefix if add_space_prefix is None else add_space_prefix
    w.add_add_space_prefix(prefix)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def texts_for(layout: SpmLayout) -> list[str]:
    """``TEXTS`` plus texts with this vocabulary's special and added tokens inside them."""
    s = layout.specials_in_text
    return TEXTS + [
        f"{s[0]}starts with bos",
        f"text{s[1]}after eos {s[2]} unk",
        f"{s[-1]}user-defined first, then {s[-1]}inside{s[-1]} and {s[-2]} x",
        " ".join(s),
        "".join(s),
        f"  {s[3]}  spaced  {s[4]}\n",
        f"a{s[3]}b {s[3]} c{s[3]}",
        "<s>, </s>, <unk>, <think> spelled in a text",
    ]
