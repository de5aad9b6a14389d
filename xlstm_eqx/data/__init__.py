"""Level 3: text in, tokens out — tokenizers, sources (text, JSONL, Hugging Face datasets), the
token store, the corpus split, the batch sampler, per-process batch loading and evaluation windows."""

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
    unigram_bits_per_byte_from_counts as unigram_bits_per_byte_from_counts,
)
from .corpus_identity import (
    CorpusChangedError as CorpusChangedError,
    corpus_identity as corpus_identity,
)
from .loader import (
    BatchLoader as BatchLoader,
    load_corpus_all_processes as load_corpus_all_processes,
    process_rows as process_rows,
)
from .sources import (
    Source as Source,
    iter_capped_pieces as iter_capped_pieces,
    iter_pieces as iter_pieces,
    resolve_sources as resolve_sources,
    split_text as split_text,
)
from .store import (
    StoreOptions as StoreOptions,
    TokenFile as TokenFile,
    TokenStore as TokenStore,
    build_store as build_store,
    default_cache_dir as default_cache_dir,
    open_store as open_store,
    store_for as store_for,
)
from .tokenizer import (
    ByteTokenizer as ByteTokenizer,
    HFTokenizer as HFTokenizer,
    Tokenizer as Tokenizer,
    encode_batch as encode_batch,
    load_tokenizer as load_tokenizer,
    padded_vocab_size as padded_vocab_size,
    resolve_eod_id as resolve_eod_id,
    tokenizer_from_dict as tokenizer_from_dict,
)
