"""Level 3: text in, tokens out — tokenizers, corpus files, the batch sampler and evaluation windows."""

from .corpus import (
    BatchSampler as BatchSampler,
    Corpus as Corpus,
    check_token_ids as check_token_ids,
    default_corpus_files as default_corpus_files,
    eval_windows as eval_windows,
    load_corpus as load_corpus,
    read_documents as read_documents,
    resolve_paths as resolve_paths,
    unigram_bits_per_byte as unigram_bits_per_byte,
)
from .tokenizer import (
    ByteTokenizer as ByteTokenizer,
    HFTokenizer as HFTokenizer,
    Tokenizer as Tokenizer,
    load_tokenizer as load_tokenizer,
    padded_vocab_size as padded_vocab_size,
    tokenizer_from_dict as tokenizer_from_dict,
)
