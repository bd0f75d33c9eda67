"""Small tokenizers of the families `qlora` reads, trained with HF `tokenizers` (the library
that defines `tokenizer.json`), for the tests of piecewise tokenization of long texts.

    ~/.cache/qlora/peft-venv/bin/python scripts/make_tokenizer_fixtures.py

Writes tests/fixtures/tokenizers/{wordpiece,spm-bpe,unigram}.json The
training text is the repository's own documentation.
"""
import pathlib

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers.implementations import BertWordPieceTokenizer, SentencePieceUnigramTokenizer

root = pathlib.Path(__file__).resolve().parent.parent
out = root / "tests" / "fixtures" / "tokenizers"
out.mkdir(parents=True, exist_ok=True)
docs = [root / "README.md"] + sorted((root / "docs").glob("*.md"))
corpus = [l for p in docs for l in p.read_text().splitlines() if l.strip()]
corpus += ["Ünïcödé café naïve 東京タワー 12345 67.89 $100 e-mail@example.com", "tabs\tand  spaces"]

# BERT: lowercasing normalizer, whitespace/punctuation pre-tokenizer, [CLS] x [SEP].
bert = BertWordPieceTokenizer(lowercase=True)
bert.train_from_iterator(corpus, vocab_size=400, min_frequency=1)
bert.post_processor = processors.BertProcessing(
    ("[SEP]", bert.token_to_id("[SEP]")), ("[CLS]", bert.token_to_id("[CLS]"))
)
bert.save(str(out / "wordpiece.json"))

# Llama 2 / Mistral v0.1: SentencePiece BPE as transformers converts it, with a normalizer that
# prepends "▁" and replaces spaces, no pre-tokenizer, byte fallback, BOS by template.
spm = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
spm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
spm.decoder = decoders.Sequence(
    [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
)
bytes_ = [f"<0x{b:02X}>" for b in range(256)]
trainer = trainers.BpeTrainer(
    vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"] + bytes_, min_frequency=1
)
# SentencePiece never merges across a word boundary: train on words with their "▁".
spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
spm.train_from_iterator([l.replace(" ", "▁") for l in corpus], trainer=trainer)
spm.pre_tokenizer = None
spm.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", spm.token_to_id("<s>"))]
)
spm.save(str(out / "spm-bpe.json"))

# T5 / ALBERT style: Unigram with the Metaspace pre-tokenizer.
uni = SentencePieceUnigramTokenizer()
uni.train_from_iterator(corpus, vocab_size=300, special_tokens=["<unk>", "</s>"], unk_token="<unk>")
uni.post_processor = processors.TemplateProcessing(
    single="$A </s>", special_tokens=[("</s>", uni.token_to_id("</s>"))]
)
uni.save(str(out / "unigram.json"))
print("wrote", sorted(p.name for p in out.iterdir()))
